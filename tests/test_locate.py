"""Locating documents inside a prompt rendered elsewhere (moved from langchain_at2's tests with the code)."""

from __future__ import annotations

import pytest

from at2_rag import Document as AT2Document
from at2_rag import InvalidInputError
from at2_rag.prompting.locate import locate_documents, locate_prompt
from at2_rag.prompting.render import render_messages

A = AT2Document(id="a", text="The Amazon River flows through South America.")
B = AT2Document(id="b", text="Jupiter is the largest planet.\nIt is a gas giant.")
C = AT2Document(id="c", text="Octopuses have three hearts.")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from at2_rag.models import default_model_path

    return AutoTokenizer.from_pretrained(str(default_model_path()), use_fast=True)


def test_exact_and_whitespace_matches_in_prompt_order() -> None:
    prompt = f"Context:\n{B.text.replace(chr(10), '  ')}\n\n[1] {A.text}\n\nQuestion: rivers?"
    located, unlocated = locate_documents(prompt, [A, B])
    assert not unlocated
    assert [d.document.id for d in located] == ["b", "a"]  # sorted by position in the prompt
    by_id = {d.document.id: d for d in located}
    assert by_id["a"].match == "exact" and by_id["a"].document is A
    assert by_id["b"].match == "whitespace"
    for d in located:
        assert prompt[d.start : d.end] == d.document.text
    assert [d.position for d in located] == [1, 0]


def test_missing_duplicate_and_empty_documents_are_reported() -> None:
    dup = AT2Document(id="dup", text=A.text)
    empty = AT2Document(id="empty", text="  ")
    prompt = f"{A.text}\n{C.text[:10]}"
    located, unlocated = locate_documents(prompt, [A, dup, C, empty])
    assert [d.document.id for d in located] == ["a"]
    reasons = {u.id: u.reason for u in unlocated}
    assert set(reasons) == {"dup", "c", "empty"}
    assert "another document" in reasons["dup"]
    assert "does not occur" in reasons["c"]
    assert reasons["empty"] == "empty text"
    assert [u.position for u in unlocated] == [1, 2, 3]
    assert unlocated[1].to_dict() == {"id": "c", "title": None, "position": 2, "reason": reasons["c"]}
    # the same text twice in the prompt: each copy goes to one document
    located, unlocated = locate_documents(f"{A.text}\n{A.text}", [A, dup])
    assert len(located) == 2 and not unlocated


def test_token_spans_cover_exactly_the_documents(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Answer from the context.\n\n" + A.text + "\n\n" + B.text},
        {"role": "user", "content": "Which planet is largest?"},
    ]
    text, used = render_messages(tokenizer, messages)
    assert used
    lp = locate_prompt(tokenizer, text, [A, B, C])
    assert [u.id for u in lp.unlocated] == ["c"]
    prompt = lp.prompt
    assert prompt.unlocated_documents is lp.unlocated  # runs over the prompt report them
    assert [d.id for d in prompt.documents] == ["a", "b"]
    for (start, end), doc in zip(prompt.doc_token_spans, prompt.documents):
        decoded = tokenizer.decode(prompt.input_ids[start:end])
        assert decoded.strip() == doc.text
    # one sentence source per document sentence, spans inside their document's span
    assert len(prompt.sentence_sources) == 3
    for src, (s0, s1) in zip(prompt.sentence_sources, prompt.sentence_token_spans):
        d0, d1 = prompt.doc_token_spans[src.doc_index]
        assert d0 <= s0 < s1 <= d1


def test_no_documents_gives_a_plain_prompt(tokenizer) -> None:
    text, _ = render_messages(tokenizer, [{"role": "user", "content": "hi"}])
    lp = locate_prompt(tokenizer, text, [])
    assert lp.prompt.documents == [] and lp.prompt.num_tokens > 0 and lp.unlocated == []


def test_render_messages_accepts_message_objects_and_checks_roles(tokenizer) -> None:
    class Msg:  # a LangChain-style message: `type` + `content`
        def __init__(self, type_: str, content: str) -> None:
            self.type, self.content = type_, content

    as_dicts, _ = render_messages(tokenizer, [{"role": "user", "content": "hi"}])
    as_objects, _ = render_messages(tokenizer, [Msg("human", "hi")])
    as_pairs, _ = render_messages(tokenizer, [("user", "hi")])
    assert as_dicts == as_objects == as_pairs
    with pytest.raises(InvalidInputError, match="message 0"):
        render_messages(tokenizer, [{"role": "wizard", "content": "hi"}])


def test_render_messages_without_a_chat_template(tokenizer) -> None:
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    text, used = render_messages(plain, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert not used and text == "System: Be brief.\n\nUser: hi\n\nAssistant:"
