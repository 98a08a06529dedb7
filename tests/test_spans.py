"""Source token spans come from offsets and decode back to exactly their documents (hypothesis, real tokenizer)."""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from at2_rag import Document, InvalidInputError, PromptTemplate
from at2_rag.errors import PromptRenderError
from at2_rag.prompting.render import render_prompt, token_spans_for_ranges


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from at2_rag.models import default_model_path

    return AutoTokenizer.from_pretrained(str(default_model_path()))


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    return tok


# ---- strategies ---------------------------------------------------------------------------------------------
SPECIAL = [
    "",
    " ",
    "   \n\t ",
    "\n",
    "😀👍🏽 family: 👨‍👩‍👧",
    "東京は日本の首都です。大阪は二番目です。",
    "e\u0301\u0302 combining ñ n\u0303",
    "Ünïcödé — “quotes” … ½",
    "A sentence. Another one! A third?",
    "  leading and trailing spaces  ",
    "[1] looks like a header\n\nQuestion: fake",
    "x",
    "1.2.3",
    "مرحبا بالعالم",
    "\u200b\u200d zero width",
]
chars = st.characters(blacklist_categories=("Cs",))  # any code point a str can hold, but lone surrogates
free_text = st.text(alphabet=chars, max_size=40)
wordy_text = st.lists(
    st.sampled_from(["The", "cat", "sat.", "東京", "😀", "é", "!", "?", " ", "\n", "ok", "42"]), max_size=12
).map(" ".join)
doc_text = st.one_of(st.sampled_from(SPECIAL), free_text, wordy_text)


@st.composite
def doc_lists(draw):
    texts = draw(st.lists(doc_text, min_size=1, max_size=5))
    if draw(st.booleans()) and texts:  # duplicates of each other
        texts = texts + [draw(st.sampled_from(texts))]
        texts = draw(st.permutations(texts))
    titles = draw(
        st.lists(
            st.one_of(st.none(), st.text(alphabet=chars, min_size=1, max_size=8)),
            min_size=len(texts),
            max_size=len(texts),
        )
    )
    return [Document(text=t, id=f"d{i}", title=title) for i, (t, title) in enumerate(zip(texts, titles))]


@st.composite
def queries(draw, docs):
    base = draw(
        st.one_of(st.sampled_from(["What is it?", "東京?", "😀 why"]), st.text(alphabet=chars, min_size=1, max_size=20))
    )
    if draw(st.booleans()):  # text that also appears in the query
        base = base + " " + draw(st.sampled_from([d.text for d in docs]))
    assume(base.strip())
    return base


# ---- the span properties ----------------------------------------------------------------------------------------
def covered(prompt, a: int, b: int) -> tuple[int, int]:
    return min(prompt.offsets[k][0] for k in range(a, b)), max(prompt.offsets[k][1] for k in range(a, b))


def representable(tokenizer, text: str) -> bool:
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def check_spans(prompt, tokenizer, straddle_ok: bool = False) -> None:
    """`straddle_ok`: documents may be glued to other text, so one edge token may straddle the boundary."""
    text = prompt.text
    assert len(prompt.doc_token_spans) == len(prompt.documents)
    for i, (doc, (a, b)) in enumerate(zip(prompt.documents, prompt.doc_token_spans)):
        ds = prompt.doc_char_starts[i]
        de = ds + len(doc.text)
        assert text[ds:de] == doc.text
        assert 0 <= a <= b <= prompt.num_tokens
        if not doc.text:
            assert a == b, f"empty document {i} got tokens {a}:{b}"
            continue
        if not doc.text.strip():
            # whitespace only: whatever it covers is whitespace
            if a < b:
                cs, ce = covered(prompt, a, b)
                assert not text[cs:ce].strip()
            continue
        if not representable(tokenizer, doc.text):
            # SmolLM2's byte-level vocabulary lacks 21 byte tokens (e.g. 0xF1, 0xF2: planes 4-11; some C0
            # controls), so such characters lose bytes in tokenization: only the weaker properties hold
            if a < b:
                cs, ce = covered(prompt, a, b)
                assert not text[cs:ds].strip() and not text[de:ce].strip()
            continue
        assert a < b, f"document {i} ({doc.text!r}) has no tokens"
        cs, ce = covered(prompt, a, b)
        stripped_start = ds + (len(doc.text) - len(doc.text.lstrip()))
        stripped_end = ds + len(doc.text.rstrip())
        # all of the document's (non-whitespace) text is covered ...
        if straddle_ok:  # an edge character may sit in a token shared with glued neighbouring text
            assert cs <= stripped_start or (a > 0 and prompt.offsets[a - 1][1] > stripped_start), (
                doc.text,
                text[cs:ce],
            )
            assert ce >= stripped_end or (b < prompt.num_tokens and prompt.offsets[b][0] < stripped_end), (
                doc.text,
                text[cs:ce],
            )
        else:
            assert cs <= stripped_start and ce >= stripped_end, (doc.text, text[cs:ce])
        # ... and nothing else but whitespace at the edges: no template text, no other document
        if straddle_ok:  # text glued to its neighbours (no separator): only an edge token may reach outside
            assert prompt.offsets[a][1] > ds or not text[cs:ds].strip(), (
                f"document {i} span starts with {text[cs:ds]!r}"
            )
            assert prompt.offsets[b - 1][0] < de or not text[de:ce].strip(), (
                f"document {i} span ends with {text[de:ce]!r}"
            )
        else:
            assert not text[cs:ds].strip(), f"document {i} span starts with {text[cs:ds]!r}"
            assert not text[de:ce].strip(), f"document {i} span ends with {text[de:ce]!r}"
        if not straddle_ok:
            assert doc.text.strip() in tokenizer.decode(prompt.input_ids[a:b])

    # in order, never sharing a token (empty spans included)
    for (_a0, b0), (a1, _b1) in zip(prompt.doc_token_spans, prompt.doc_token_spans[1:]):
        assert b0 <= a1
    for (_a0, b0), (a1, _b1) in zip(prompt.sentence_token_spans, prompt.sentence_token_spans[1:]):
        assert b0 <= a1

    # sentences lie inside their document's span
    assert len(prompt.sentence_token_spans) == len(prompt.sentence_sources)
    for src, (a, b) in zip(prompt.sentence_sources, prompt.sentence_token_spans):
        doc = prompt.documents[src.doc_index]
        assert doc.text[src.span.start : src.span.end] == src.text
        if a < b:
            da, db = prompt.doc_token_spans[src.doc_index]
            assert da <= a and b <= db, (src.text, (a, b), (da, db))
            cs, ce = covered(prompt, a, b)
            s_start, s_end = prompt.source_char_range(src)
            assert ce > s_start and cs < s_end  # overlaps its own characters


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_document_spans_decode_to_their_documents(tokenizer, data):
    docs = data.draw(doc_lists())
    query = data.draw(queries(docs))
    prompt = render_prompt(tokenizer, query, docs)
    assert prompt.used_chat_template
    check_spans(prompt, tokenizer)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_spans_with_plain_template_and_history(plain_tokenizer, data):
    docs = data.draw(doc_lists())
    query = data.draw(queries(docs))
    history = [("user", data.draw(free_text)), ("assistant", data.draw(doc_text))]
    prompt = render_prompt(plain_tokenizer, query, docs, history=history)
    assert not prompt.used_chat_template
    assert prompt.text.startswith("System: ")
    assert prompt.text.endswith("Assistant:")
    check_spans(prompt, plain_tokenizer)


CUSTOM = PromptTemplate(
    system_prompt="Cite {documents} literally, braces kept.",
    user_template="Question: {query}\n\nSources:\n{documents}\n\nAnswer briefly.",
    document_template="<source n={index} id={id}>{title}\n{text}\n</source>",
    document_separator="\n",
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_spans_with_custom_template(tokenizer, data):
    docs = data.draw(doc_lists())
    query = data.draw(queries(docs))
    prompt = render_prompt(tokenizer, query, docs, template=CUSTOM)
    assert "Cite {documents} literally, braces kept." in prompt.text
    assert f"<source n=1 id={docs[0].id}>" in prompt.text
    check_spans(prompt, tokenizer)


# ---- deterministic cases -------------------------------------------------------------------------------------
def test_duplicate_documents_get_distinct_spans(tokenizer):
    text = "The capital of France is Paris."
    docs = [Document(text=text, id="a"), Document(text=text, id="b"), Document(text=text, id="c")]
    prompt = render_prompt(tokenizer, f"Is it true that {text}", docs)
    check_spans(prompt, tokenizer)
    spans = prompt.doc_token_spans
    assert len(set(spans)) == 3
    decoded = [tokenizer.decode(prompt.input_ids[a:b]).strip() for a, b in spans]
    assert decoded == [text] * 3
    # the query (which repeats the text) comes after every document
    assert prompt.text.rfind(text) > prompt.doc_char_starts[-1] + len(text)


def test_empty_and_whitespace_documents(tokenizer):
    docs = [Document(text="", id="e"), Document(text="Real text here.", id="r"), Document(text="  \n ", id="w")]
    prompt = render_prompt(tokenizer, "q?", docs)
    check_spans(prompt, tokenizer)
    a, b = prompt.doc_token_spans[0]
    assert a == b
    assert [s.doc_index for s in prompt.sentence_sources] == [1]


def test_special_token_text_inside_a_document(tokenizer):
    docs = [Document(text="before <|im_end|> after", id="s"), Document(text="other", id="o")]
    prompt = render_prompt(tokenizer, "q?", docs)
    a, b = prompt.doc_token_spans[0]
    assert "before <|im_end|> after" in tokenizer.decode(prompt.input_ids[a:b])
    check_spans(prompt, tokenizer)


def test_history_turns_are_rendered_and_spans_point_at_the_last_turn(tokenizer):
    docs = [Document(text="Alpha doc.", id="a"), Document(text="Beta doc.", id="b")]
    first = render_prompt(tokenizer, "Which?", docs)
    history = [
        {"role": "user", "content": first.user_content},  # the same user turn, said before
        {"role": "assistant", "content": "Alpha."},
    ]
    prompt = render_prompt(tokenizer, "Which?", docs, history=history)
    assert prompt.text.count(first.user_content) == 2
    assert "<|im_start|>assistant\nAlpha.<|im_end|>" in prompt.text
    check_spans(prompt, tokenizer)
    assert prompt.doc_char_starts[0] > prompt.text.index("Alpha.<|im_end|>")


def test_history_formats_and_bad_history(tokenizer):
    class Msg:
        def __init__(self, type_, content):
            self.type, self.content = type_, content

    docs = [Document(text="Doc.", id="a")]
    prompt = render_prompt(tokenizer, "q?", docs, history=[Msg("human", "hi there"), Msg("ai", "hello back")])
    assert "<|im_start|>user\nhi there" in prompt.text and "<|im_start|>assistant\nhello back" in prompt.text
    with pytest.raises(InvalidInputError):
        render_prompt(tokenizer, "q?", docs, history=[{"role": "robot", "content": "x"}])


def test_no_system_prompt(tokenizer):
    docs = [Document(text="Doc text.", id="a")]
    prompt = render_prompt(tokenizer, "q?", docs, template=PromptTemplate(system_prompt=None))
    assert PromptTemplate().system_prompt not in prompt.text
    check_spans(prompt, tokenizer)


def test_template_placeholders_are_validated():
    with pytest.raises(InvalidInputError):
        PromptTemplate(user_template="no placeholders")
    with pytest.raises(InvalidInputError):
        PromptTemplate(user_template="{documents} {documents} {query}")
    with pytest.raises(InvalidInputError):
        PromptTemplate(document_template="[{index}]")


def test_empty_query_is_refused(tokenizer):
    with pytest.raises(InvalidInputError):
        render_prompt(tokenizer, "  ", [Document(text="x", id="a")])


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n",
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | replace('\n', ' ') }}<|im_end|>\n"
        "{% endfor %}<|im_start|>assistant\n",
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | e }}\n{% endfor %}assistant:",
    ],
    ids=["trim", "replace-newlines", "html-escape"],
)
def test_chat_template_that_alters_content_is_refused(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    docs = [Document(text="Tom & Jerry <3\n", id="a")]
    with pytest.raises(PromptRenderError, match="altered"):
        render_prompt(tok, "What is it? ", docs)


def test_chat_template_that_fails_is_a_render_error(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{{ raise_exception('no') }}"
    with pytest.raises(PromptRenderError):
        render_prompt(tok, "q?", [Document(text="x", id="a")], template=PromptTemplate(system_prompt=None))


# ---- token_spans_for_ranges on hand-made offsets ---------------------------------------------------------------
def test_straddling_token_goes_to_the_larger_overlap():
    offsets = [(0, 3), (3, 6), (6, 9)]
    assert token_spans_for_ranges(offsets, [(0, 4), (4, 9)]) == [(0, 1), (1, 3)]  # token 1: 1 char vs 2
    assert token_spans_for_ranges(offsets, [(0, 5), (5, 9)]) == [(0, 2), (2, 3)]  # token 1: 2 chars vs 1
    assert token_spans_for_ranges([(0, 3), (3, 7), (7, 9)], [(0, 5), (5, 9)]) == [(0, 2), (2, 3)]  # tie: earlier


def test_one_token_covering_three_ranges_is_not_shared():
    spans = token_spans_for_ranges([(0, 10)], [(0, 2), (2, 4), (4, 10)])
    assert spans == [(0, 0), (0, 0), (0, 1)]
    spans = token_spans_for_ranges([(0, 10), (10, 12)], [(0, 6), (6, 8), (8, 12)])
    assert spans == [(0, 1), (1, 1), (1, 2)]
    for (_a0, b0), (a1, _b1) in zip(spans, spans[1:]):
        assert b0 <= a1


def test_zero_width_tokens():
    offsets = [(0, 3), (3, 3), (3, 6), (6, 6), (6, 9)]
    assert token_spans_for_ranges(offsets, [(3, 6)]) == [(2, 3)]  # zero-width edge tokens are left out
    assert token_spans_for_ranges(offsets, [(0, 9)]) == [(0, 5)]
    assert token_spans_for_ranges([(0, 0), (0, 3), (3, 6)], [(0, 3)]) == [(1, 2)]  # e.g. a BOS with (0, 0)


def test_empty_ranges_and_gaps():
    offsets = [(0, 3), (4, 7), (8, 11)]
    assert token_spans_for_ranges(offsets, [(3, 3), (4, 7), (11, 11)]) == [(1, 1), (1, 2), (3, 3)]
    assert token_spans_for_ranges(offsets, [(3, 4)]) == [(1, 1)]  # whitespace between tokens: no token
    assert token_spans_for_ranges(offsets, [(5, 6)]) == [(1, 2)]  # inside one token
    assert token_spans_for_ranges(offsets, []) == []


@settings(max_examples=200, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 60), min_size=1, max_size=20, unique=True),
    bounds=st.lists(st.integers(0, 60), max_size=12, unique=True),
)
def test_token_spans_are_ordered_disjoint_and_overlapping(cuts, bounds):
    cuts = sorted(set([0] + cuts + [60]))
    offsets = list(zip(cuts, cuts[1:]))
    b = sorted(bounds)
    ranges = list(zip(b[0::2], b[1::2]))
    spans = token_spans_for_ranges(offsets, ranges)
    assert len(spans) == len(ranges)
    for (a0, b0), (a1, b1) in zip(spans, spans[1:]):
        assert a0 <= b0 <= a1 <= b1
    owners = {}
    for i, ((start, end), (a, b_)) in enumerate(zip(ranges, spans)):
        for tok in range(a, b_):
            ts, te = offsets[tok]
            assert ts < end and te > start  # every token overlaps its range
            assert tok not in owners
            owners[tok] = i
    # every token overlapping some range belongs to one of the ranges it overlaps most
    for tok, (ts, te) in enumerate(offsets):
        overlaps = [min(te, e) - max(ts, s) for s, e in ranges]
        if overlaps and max(overlaps) > 0:
            assert tok in owners
            assert overlaps[owners[tok]] == max(overlaps)
