"""AT2 over a prompt somebody else rendered: find each document's text inside it, then capture and score.

at2-rag's `Attributor` renders its own prompt from (query, documents, history). LangChain chains format the
documents into their own prompt (a ChatPromptTemplate, a `format_docs` join, ...), so here the documents are
*located* in the finished prompt instead: exact text first, then the same words with any whitespace between them.
Documents that cannot be found are reported (`UnlocatedDocument`), never silently dropped.

This module is written against the core's building blocks only (`RenderedPrompt`, `token_spans_for_ranges`,
`capture_attention`, `source_matrix`, `build_sources`, `Attributor.build_attribution`), so that it can move
into `at2_rag` as `Attributor.locate_prompt / generate_located / forward_located / attribute_rendered`
(see docs/langchain.md, "Core API this package would like").
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from at2_rag import Attribution, Attributor, ContextTooLongError, InvalidInputError
from at2_rag import Document as AT2Document
from at2_rag.attributor import CapturedRun
from at2_rag.capture import capture_attention, source_matrix
from at2_rag.features import AnswerTokens, decode_with_offsets, encode_with_offsets
from at2_rag.prompt import RenderedPrompt, _apply_template, token_spans_for_ranges
from at2_rag.sources import build_sources, normalize_documents

__all__ = [
    "LocatedDocument",
    "LocatedPrompt",
    "UnlocatedDocument",
    "attribute_rendered",
    "forward_located",
    "generate_located",
    "locate_documents",
    "locate_prompt",
    "render_chat",
    "stream_located",
]


@dataclass(frozen=True)
class LocatedDocument:
    """A document found in the prompt: `prompt[start:end]` is its text (`document.text`)."""

    position: int  # index in the caller's list of documents
    document: AT2Document  # text = exactly the prompt's characters (differs from the input only in whitespace)
    start: int
    end: int
    match: str  # "exact" | "whitespace"


@dataclass(frozen=True)
class UnlocatedDocument:
    """A document that is not in the prompt, and why."""

    position: int
    id: str
    title: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "position": self.position, "reason": self.reason}


@dataclass
class LocatedPrompt:
    """A rendered prompt whose sources are the located documents (in prompt order) and their sentences."""

    prompt: RenderedPrompt
    located: list[LocatedDocument] = field(default_factory=list)
    unlocated: list[UnlocatedDocument] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.prompt.text


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> tuple[str, bool]:
    """The model's chat template over role/content dicts, with the generation prompt; (text, used_template)."""
    return _apply_template(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages])


def _whitespace_pattern(text: str) -> re.Pattern[str] | None:
    words = text.split()
    if not words:
        return None
    return re.compile(r"\s+".join(re.escape(w) for w in words))


def _occurrences(prompt: str, needle: str) -> Iterator[tuple[int, int, str]]:
    start = prompt.find(needle)
    while start >= 0:
        yield start, start + len(needle), "exact"
        start = prompt.find(needle, start + 1)
    pattern = _whitespace_pattern(needle)
    if pattern is not None:
        for m in pattern.finditer(prompt):
            if m.group(0) != needle:
                yield m.start(), m.end(), "whitespace"


def locate_documents(
    prompt: str, documents: Sequence[AT2Document]
) -> tuple[list[LocatedDocument], list[UnlocatedDocument]]:
    """Find every document's (stripped) text in `prompt`; each prompt character belongs to at most one document.

    Documents are matched in order, each to its first occurrence not already taken by an earlier one, so
    duplicates and documents contained in others are reported instead of sharing a span. Returns the located
    documents sorted by position in the prompt, and the rest with a reason.
    """
    taken: list[tuple[int, int]] = []
    located: list[LocatedDocument] = []
    unlocated: list[UnlocatedDocument] = []
    for position, doc in enumerate(documents):
        needle = doc.text.strip()
        if not needle:
            unlocated.append(UnlocatedDocument(position, doc.id or f"doc{position}", doc.title, "empty text"))
            continue
        found = None
        clashed = False
        for a, b, kind in _occurrences(prompt, needle):
            if any(a < tb and ta < b for ta, tb in taken):
                clashed = True
                continue
            found = (a, b, kind)
            break
        if found is None:
            reason = (
                "its text only occurs inside another document's span (duplicate or contained text)"
                if clashed
                else "its text does not occur in the prompt (was it truncated, reformatted or left out?)"
            )
            unlocated.append(UnlocatedDocument(position, doc.id or f"doc{position}", doc.title, reason))
            continue
        a, b, kind = found
        taken.append((a, b))
        text = prompt[a:b]
        located_doc = doc if text == doc.text else doc.model_copy(update={"text": text})
        located.append(LocatedDocument(position, located_doc, a, b, kind))
    located.sort(key=lambda d: d.start)
    return located, unlocated


def locate_prompt(
    tokenizer: Any,
    text: str,
    documents: Sequence[Any] = (),
    *,
    used_chat_template: bool = True,
) -> LocatedPrompt:
    """Tokenize `text` (no special tokens added, as the core does) and map located documents to token spans."""
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidInputError("at2-rag needs a fast (Rust) tokenizer for exact offset mapping")
    docs = normalize_documents(documents) if len(documents) else []
    located, unlocated = locate_documents(text, docs)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in encoding["offset_mapping"]]
    ordered = [d.document for d in located]
    doc_sources, sentence_sources = build_sources(ordered)
    prompt = RenderedPrompt(
        text=text,
        input_ids=list(encoding["input_ids"]),
        offsets=offsets,
        documents=ordered,
        user_content="",
        doc_sources=doc_sources,
        sentence_sources=sentence_sources,
        doc_char_starts=[d.start for d in located],
        used_chat_template=used_chat_template,
    )
    prompt.doc_token_spans = token_spans_for_ranges(offsets, [prompt.source_char_range(s) for s in doc_sources])
    prompt.sentence_token_spans = token_spans_for_ranges(
        offsets, [prompt.source_char_range(s) for s in sentence_sources]
    )
    return LocatedPrompt(prompt, located, unlocated)


# ---- runs over a ready RenderedPrompt (mirror Attributor.generate_run / forward_run) --------------------------
def _check_length(attributor: Attributor, needed: int, what: str) -> None:
    limit = attributor.context_window
    if limit is not None and needed > limit:
        raise ContextTooLongError(needed, limit, what)


def _lock(attributor: Attributor) -> Any:
    lock = getattr(attributor, "_lock", None)
    if lock is None:  # pragma: no cover - older/newer core
        from at2_rag.attributor import _model_lock

        lock = _model_lock(attributor.model)
    return lock


def _matrix(prompt: RenderedPrompt) -> torch.Tensor:
    return source_matrix(prompt.num_tokens, prompt.doc_token_spans + prompt.sentence_token_spans)


def generate_located(
    attributor: Attributor,
    prompt: RenderedPrompt,
    max_new_tokens: int = 256,
    *,
    capture: bool = True,
    **generate_kwargs: Any,
) -> CapturedRun:
    """Generate after `prompt` (greedy by default) while capturing attention to its sources.

    With `capture=False` it is a plain generation (no features; for prompts without documents).
    """
    if max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    _check_length(attributor, prompt.num_tokens + max_new_tokens, f"prompt plus max_new_tokens={max_new_tokens}")
    model = attributor.model
    input_ids = torch.tensor([prompt.input_ids], device=attributor.device)
    kwargs: dict[str, Any] = {"do_sample": False, "pad_token_id": attributor._pad_id()}
    if not generate_kwargs.get("do_sample"):
        kwargs.update(temperature=None, top_p=None, top_k=None)
    kwargs.update(generate_kwargs)
    ctx = (
        capture_attention(model, _matrix(prompt), prompt.num_tokens - 1)
        if capture
        else contextlib.nullcontext(None)
    )
    with _lock(attributor), torch.no_grad(), ctx as state:
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            **kwargs,
        )
    generated = output[0, prompt.num_tokens :].tolist()
    eos = attributor._eos_ids()
    finish = "length"
    while generated and generated[-1] in eos:
        generated.pop()
        finish = "stop"
    if state is not None:
        features = state.features()[0][: len(generated)]
    else:
        features = torch.zeros(len(generated), 0, attributor.num_layers * attributor.num_heads)
    answer = decode_with_offsets(attributor.tokenizer, generated) if capture else _plain_answer(attributor, generated)
    return CapturedRun(prompt, answer, features, finish)


def _plain_answer(attributor: Attributor, generated: list[int]) -> AnswerTokens:
    text = attributor.tokenizer.decode(generated, skip_special_tokens=True)
    return AnswerTokens(token_ids=generated, text=text, char_spans=[])


def forward_located(attributor: Attributor, prompt: RenderedPrompt, answer: str) -> CapturedRun:
    """One forward pass over `prompt + answer`, capturing the answer rows' attention to the prompt's sources."""
    if not isinstance(answer, str) or not answer.strip():
        raise InvalidInputError("answer must be a non-empty string")
    tokens = encode_with_offsets(attributor.tokenizer, answer)
    _check_length(attributor, prompt.num_tokens + len(tokens.token_ids), "prompt plus answer")
    ids = torch.tensor([prompt.input_ids + tokens.token_ids], device=attributor.device)
    start = prompt.num_tokens - 1
    with _lock(attributor), torch.no_grad(), capture_attention(
        attributor.model, _matrix(prompt), start, start + len(tokens.token_ids)
    ) as state:
        attributor.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=1)
    return CapturedRun(prompt, tokens, state.features()[0], None)


def stream_located(
    attributor: Attributor,
    prompt: RenderedPrompt,
    query: str,
    max_new_tokens: int = 256,
    *,
    capture: bool = True,
    **generate_kwargs: Any,
) -> Iterator[str | Attribution | CapturedRun]:
    """Yield text chunks as generated, then the Attribution (or, with `capture=False`, the CapturedRun)."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(attributor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["run"] = generate_located(
                attributor, prompt, max_new_tokens, capture=capture, streamer=streamer, **generate_kwargs
            )
        except BaseException as exc:  # re-raised in the consuming thread
            outcome["error"] = exc
            streamer.end()

    if max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    _check_length(attributor, prompt.num_tokens + max_new_tokens, f"prompt plus max_new_tokens={max_new_tokens}")
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    for chunk in streamer:
        if chunk:
            yield chunk
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    run = outcome["run"]
    yield attributor.build_attribution(run, query) if capture else run


def attribute_rendered(
    attributor: Attributor,
    prompt: str | Sequence[Mapping[str, str]],
    documents: Sequence[Any],
    answer: str,
    query: str = "",
) -> tuple[Attribution | None, LocatedPrompt]:
    """Attribute `answer` to the documents inside an already-rendered prompt (a string, or role/content dicts
    rendered with the model's chat template). Returns (None, located) when no document occurs in the prompt."""
    if isinstance(prompt, str):
        text, used = prompt, False
    else:
        text, used = render_chat(attributor.tokenizer, prompt)
    located = locate_prompt(attributor.tokenizer, text, documents, used_chat_template=used)
    if not located.located:
        return None, located
    run = forward_located(attributor, located.prompt, answer)
    return attributor.build_attribution(run, query), located
