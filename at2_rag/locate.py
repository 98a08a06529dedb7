"""Locate documents inside a prompt somebody else rendered, and map them to exact token spans.

`render_prompt` builds its own prompt, so it knows where every document is. Frameworks (LangChain chains, a
LlamaIndex synthesizer, a hand-written f-string) format the documents into *their* prompt; here each document
is found in the finished prompt instead: its exact (stripped) text first, then the same words with any
whitespace between them. Documents that cannot be found are reported (`UnlocatedDocument`, with the reason),
never silently dropped. The result is an ordinary `RenderedPrompt` whose sources are the located documents (in
prompt order) and their sentences, so every run and the scoring work on it unchanged
(`Attributor.locate`, `Attributor.attribute_rendered`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from .errors import InvalidInputError
from .prompt import RenderedPrompt, token_spans_for_ranges
from .result import UnlocatedDocument
from .sources import Document, DocumentLike, build_sources, normalize_documents

__all__ = ["LocatedDocument", "LocatedPrompt", "UnlocatedDocument", "locate_documents", "locate_prompt"]


@dataclass(frozen=True)
class LocatedDocument:
    """A document found in the prompt: `prompt[start:end]` is its text (`document.text`)."""

    position: int  # index in the caller's list of documents
    document: Document  # text = exactly the prompt's characters (differs from the input only in whitespace)
    start: int
    end: int
    match: str  # "exact" | "whitespace"


@dataclass
class LocatedPrompt:
    """A rendered prompt whose sources are the located documents (in prompt order) and their sentences.

    `unlocated` is the same list as `prompt.unlocated_documents` (so a run over `prompt` reports them).
    """

    prompt: RenderedPrompt
    located: list[LocatedDocument] = field(default_factory=list)
    unlocated: list[UnlocatedDocument] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.prompt.text


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
    prompt: str, documents: Sequence[Document]
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
        doc_id = doc.id or f"doc{position}"
        needle = doc.text.strip()
        if not needle:
            unlocated.append(UnlocatedDocument(position=position, id=doc_id, title=doc.title, reason="empty text"))
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
            unlocated.append(UnlocatedDocument(position=position, id=doc_id, title=doc.title, reason=reason))
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
    documents: Sequence[DocumentLike] = (),
    *,
    used_chat_template: bool = True,
) -> LocatedPrompt:
    """Tokenize `text` (no special tokens added, as `render_prompt` does) and map located documents to token
    spans. With no documents it is a plain prompt without sources (for generation without capture)."""
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
        unlocated_documents=unlocated,
    )
    prompt.doc_token_spans = token_spans_for_ranges(offsets, [prompt.source_char_range(s) for s in doc_sources])
    prompt.sentence_token_spans = token_spans_for_ranges(
        offsets, [prompt.source_char_range(s) for s in sentence_sources]
    )
    return LocatedPrompt(prompt, located, unlocated)
