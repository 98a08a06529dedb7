"""Attribution over a prompt rendered elsewhere, plain generation, and the public run API (real SmolLM2)."""

from __future__ import annotations

import threading

import pytest

import at2_rag.capture._runner as runner_module
from at2_rag import Attributor, ContextTooLongError, Document, InvalidInputError, NoDocumentsError
from at2_rag.capture.attention import text_config
from at2_rag.errors import DocumentsNotLocatedError
from at2_rag.prompting.sources import UnlocatedDocument

QUERY = "When was the Eiffel Tower finished?"
DOCS = [
    Document(text="The Eiffel Tower is in Paris. It was finished in 1889.", id="eiffel", title="Eiffel Tower"),
    Document(text="Mount Fuji is the highest mountain in Japan.", id="fuji", title="Mount Fuji"),
    Document(text="Bananas are yellow when ripe. They grow in bunches.", id="banana", title="Bananas"),
]
OCTOPUS = Document(text="Octopuses have three hearts and blue blood.", id="octopus", title="Octopus")
ANSWER = "The Eiffel Tower was finished in 1889."
MAX_NEW = 16


def foreign_messages(docs=DOCS, query=QUERY) -> list[dict[str, str]]:
    """A framework's own template: documents joined by '---', no titles, no numbering."""
    content = "Context:\n" + "\n---\n".join(d.text for d in docs) + f"\nQ: {query}"
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def attributor(smollm):
    model, tokenizer = smollm
    return Attributor(model, tokenizer)


@pytest.fixture
def small_window(attributor, monkeypatch):
    """Set the model's context window for one test (restored afterwards)."""

    def set_window(n: int) -> None:
        monkeypatch.setattr(text_config(attributor.model), "max_position_embeddings", n)

    return set_window


@pytest.fixture
def thread_starts(monkeypatch):
    """Every thread the attributor module starts during the test."""
    started: list[threading.Thread] = []

    class Recording(threading.Thread):
        def start(self) -> None:
            started.append(self)
            super().start()

    monkeypatch.setattr(runner_module.threading, "Thread", Recording)
    return started


# ---- documents formatted by a foreign template ---------------------------------------------------------------
def test_foreign_template_documents_are_located(attributor):
    messages = foreign_messages()
    located = attributor.locate(messages, DOCS)
    assert located.prompt.used_chat_template and not located.unlocated
    assert [d.document.id for d in located.located] == ["eiffel", "fuji", "banana"]
    assert all(d.match == "exact" for d in located.located)
    prompt = located.prompt
    for (start, end), doc in zip(prompt.doc_token_spans, DOCS):
        assert attributor.tokenizer.decode(prompt.input_ids[start:end]).strip() == doc.text

    result = attributor.attribute_rendered(messages, DOCS, ANSWER, query=QUERY)
    assert result.answer == ANSWER and result.query == QUERY and result.finish_reason is None
    assert list(result.document_scores()) == ["eiffel", "fuji", "banana"]
    assert result.unlocated_documents == []
    assert result.prompt == prompt.text
    assert [d.text for d in result.documents] == [d.text for d in DOCS]
    assert result.top_documents(1)[0].id == "eiffel"
    assert [s.text for s in result.document("eiffel").sentences] == [
        "The Eiffel Tower is in Paris.",
        "It was finished in 1889.",
    ]


def test_whitespace_reformatted_document_is_located(attributor):
    squeezed = [Document(text=d.text.replace(" ", "  "), id=d.id) for d in DOCS[:2]]
    result = attributor.attribute_rendered(foreign_messages(squeezed), DOCS[:2], ANSWER, query=QUERY)
    assert result.unlocated_documents == []
    assert [d.text for d in result.documents] == [d.text for d in squeezed]  # the prompt's characters


def test_core_rendering_gives_the_scores_of_attribute(attributor):
    """The prompt string the core renders itself, handed back as a foreign prompt: identical spans and scores."""
    own = attributor.render(QUERY, DOCS)
    located = attributor.locate(own.text, DOCS)
    assert located.prompt.input_ids == own.input_ids
    assert located.prompt.doc_token_spans == own.doc_token_spans
    assert located.prompt.sentence_token_spans == own.sentence_token_spans

    expected = attributor.attribute(QUERY, DOCS, ANSWER)
    result = attributor.attribute_rendered(own.text, DOCS, ANSWER, query=QUERY)
    assert result.document_scores() == pytest.approx(expected.document_scores(), abs=1e-6)
    for d1, d2 in zip(result.documents, expected.documents):
        assert [s.score for s in d1.sentences] == pytest.approx([s.score for s in d2.sentences], abs=1e-6)
    assert [(c.text, c.cited) for c in result.citations] == [(c.text, c.cited) for c in expected.citations]
    for c1, c2 in zip(result.citations, expected.citations):
        assert [d.score for d in c1.documents] == pytest.approx([d.score for d in c2.documents], abs=1e-6)
    assert result.supported == expected.supported
    assert result.num_prompt_tokens == expected.num_prompt_tokens


def test_generating_after_a_rendered_prompt_equals_generate(attributor):
    own = attributor.render(QUERY, DOCS)
    expected = attributor.generate(QUERY, DOCS, max_new_tokens=MAX_NEW)
    result = attributor.attribute_rendered(own.text, DOCS, query=QUERY, max_new_tokens=MAX_NEW)
    assert result.answer == expected.answer and result.finish_reason == expected.finish_reason
    assert result.document_scores() == pytest.approx(expected.document_scores(), abs=1e-6)


# ---- documents that are not in the prompt ----------------------------------------------------------------------
def test_unlocatable_document_is_reported_with_a_reason(attributor):
    docs = [DOCS[0], OCTOPUS, DOCS[1]]
    result = attributor.attribute_rendered(foreign_messages(DOCS[:2]), docs, ANSWER, query=QUERY)
    assert list(result.document_scores()) == ["eiffel", "fuji"]
    [missing] = result.unlocated_documents
    assert isinstance(missing, UnlocatedDocument)
    assert (missing.id, missing.title, missing.position) == ("octopus", "Octopus", 1)
    assert "does not occur in the prompt" in missing.reason
    assert "octopus" in result.to_json() and "Octopus (not in the prompt" in result.to_text()
    assert "Not found in the prompt" in result._repr_html_()


def test_no_document_in_the_prompt(attributor):
    with pytest.raises(DocumentsNotLocatedError, match="octopus") as info:
        attributor.attribute_rendered(foreign_messages(DOCS[:1]), [OCTOPUS], ANSWER)
    assert isinstance(info.value, NoDocumentsError)
    assert [u.id for u in info.value.unlocated] == ["octopus"]
    with pytest.raises(DocumentsNotLocatedError):
        attributor.attribute_rendered("some prompt", [], ANSWER)
    with pytest.raises(InvalidInputError, match="answer"):
        attributor.attribute_rendered(foreign_messages(), DOCS, "  ")
    with pytest.raises(InvalidInputError, match="prompt"):
        attributor.attribute_rendered("", DOCS, ANSWER)


# ---- plain generation ------------------------------------------------------------------------------------------
def test_generate_text_equals_the_capture_path(attributor):
    messages = foreign_messages()
    captured = attributor.attribute_rendered(messages, DOCS, max_new_tokens=MAX_NEW)
    text = attributor.generate_text(messages, max_new_tokens=MAX_NEW)
    assert text.strip() and text == captured.answer
    # a string prompt is used verbatim: the same rendered text gives the same answer
    assert attributor.generate_text(attributor.locate(messages).text, max_new_tokens=MAX_NEW) == text
    assert "".join(attributor.stream_text(messages, max_new_tokens=MAX_NEW)) == text

    run = attributor._runner.generate(attributor.locate(messages).prompt, MAX_NEW, capture=False)
    assert run.answer.text == text and run.token_features.shape[1] == 0
    assert run.finish_reason in ("stop", "length")


def test_generate_text_without_documents(attributor):
    text = attributor.generate_text([{"role": "user", "content": "Say hello."}], max_new_tokens=6)
    assert text.strip()
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        attributor.generate_text("hi", max_new_tokens=0)


# ---- the context window is checked before any thread starts ------------------------------------------------------
def test_stream_checks_the_full_length_in_the_callers_thread(attributor, small_window, thread_starts):
    prompt_tokens = attributor.render(QUERY, DOCS).num_tokens
    small_window(prompt_tokens + 5)
    stream = attributor.stream(QUERY, DOCS, max_new_tokens=10)
    with pytest.raises(ContextTooLongError, match=r"max_new_tokens=10 .*\(5 too many\)"):
        next(stream)
    texts = attributor.stream_text(foreign_messages(), max_new_tokens=10_000)
    with pytest.raises(ContextTooLongError):
        next(texts)
    assert thread_starts == []  # no worker was started for either

    # and a prompt that fits streams as usual, in a worker thread
    small_window(prompt_tokens + 8)
    items = list(attributor.stream(QUERY, DOCS, max_new_tokens=4))
    assert len(thread_starts) == 1 and items[-1].num_answer_tokens <= 4


def test_check_fits(attributor, small_window):
    prompt = attributor.render(QUERY, DOCS)
    attributor._runner.check_fits(prompt, MAX_NEW)
    small_window(prompt.num_tokens + 2)
    attributor._runner.check_fits(prompt)
    attributor._runner.check_fits(prompt.num_tokens, 2)
    with pytest.raises(ContextTooLongError, match=r"max_new_tokens=3 .*\(1 too many\)"):
        attributor._runner.check_fits(prompt, 3)
    with pytest.raises(ContextTooLongError, match=r"prompt plus answer .*\(2 too many\)"):
        attributor._runner.check_fits(prompt, answer_tokens=4)
    small_window(prompt.num_tokens - 1)
    with pytest.raises(ContextTooLongError, match=r"The prompt needs .*\(1 too many\)"):
        attributor._runner.check_fits(prompt, 3)


# ---- public model facts --------------------------------------------------------------------------------------------
def test_lock_and_special_tokens(attributor, smollm):
    model, tokenizer = smollm
    other = Attributor(model, tokenizer)
    assert other.lock is attributor.lock  # one lock per model
    with attributor.lock:  # re-entrant: a run inside the caller's lock works
        assert attributor.generate_text("Hi", max_new_tokens=1) is not None
    assert tokenizer.eos_token_id in attributor._runner.eos_token_ids
    assert isinstance(attributor._runner.eos_token_ids, frozenset)
    expected_pad = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(attributor._runner.eos_token_ids)
    )
    assert attributor._runner.pad_token_id == expected_pad
