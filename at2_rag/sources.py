"""Documents and the sources inside them (whole documents and their sentences), with exact char offsets."""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable, Literal, Mapping, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InvalidInputError, NoDocumentsError


class Document(BaseModel):
    """A retrieved document. `id` is what scores are keyed by; `title`/`url` are shown in citations."""

    model_config = ConfigDict(frozen=True)

    text: str
    id: str | None = None
    title: str | None = None
    url: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


DocumentLike = Union[Document, str, Mapping[str, Any]]


class CharSpan(BaseModel):
    """A half-open character range `[start, end)`."""

    model_config = ConfigDict(frozen=True)

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


class Source(BaseModel):
    """A span of one document that can be ablated: the whole document or one of its sentences.

    `span` is relative to the document's text; `doc_index` is the document's position in the prompt.
    """

    model_config = ConfigDict(frozen=True)

    kind: Literal["document", "sentence"]
    doc_index: int
    span: CharSpan
    text: str


def to_document(item: DocumentLike, index: int) -> Document:
    """Accept a Document, a plain string, or a mapping with at least `text` (`page_content` works too)."""
    if isinstance(item, Document):
        doc = item
    elif isinstance(item, str):
        doc = Document(text=item)
    elif isinstance(item, Mapping):
        data = dict(item)
        if "text" not in data and "page_content" in data:
            data["text"] = data.pop("page_content")
        if "text" not in data:
            raise InvalidInputError(f"document {index} is a mapping without a 'text' key: keys are {sorted(data)}")
        try:
            doc = Document(**data)
        except ValidationError as exc:  # e.g. non-string text or id: one of our errors, naming the document
            raise InvalidInputError(f"document {index} is not a valid document: {exc}") from exc
    else:
        raise InvalidInputError(
            f"document {index} has type {type(item).__name__}; expected at2_rag.Document, str or a mapping with 'text'"
        )
    if not isinstance(doc.text, str):
        raise InvalidInputError(f"document {index} text must be a string, got {type(doc.text).__name__}")
    if doc.id is None:
        doc = doc.model_copy(update={"id": f"doc{index}"})
    return doc


def normalize_documents(documents: Sequence[DocumentLike] | None) -> list[Document]:
    """Turn user input into Documents with unique ids; refuse an empty list."""
    if documents is None or isinstance(documents, (str, Document)):
        raise InvalidInputError("documents must be a list of documents (wrap a single document in a list)")
    docs = [to_document(item, i) for i, item in enumerate(documents)]
    if not docs:
        raise NoDocumentsError("no documents were given: attribution needs at least one document")
    seen: dict[str, int] = {}
    for i, doc in enumerate(docs):
        if doc.id in seen:
            raise InvalidInputError(
                f"documents {seen[doc.id]} and {i} share the id {doc.id!r}; document ids must be unique"
            )
        seen[doc.id] = i
    return docs


@functools.lru_cache(maxsize=1)
def _segmenter():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False)


_FALLBACK_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+|\n|$)")


def split_sentences(text: str) -> list[CharSpan]:
    """Sentence spans of `text`, stripped of surrounding whitespace, in order, never overlapping.

    pysbd finds the boundaries (rule based, nothing downloaded); spans are re-located in the original
    text so that `text[span.start:span.end]` is always exactly the sentence. Its processor is called directly:
    `Segmenter.segment` would re-find every sentence with a fresh regex over the whole text (a third of its time,
    and quadratic), which the cursor search below does in one pass.
    """
    if not text.strip():
        return []
    spans: list[CharSpan] = []
    cursor = 0
    try:
        pieces = _segmenter().processor(text).process()
    except Exception:  # pysbd has rare crashes on odd unicode; fall back to a plain splitter
        pieces = [m.group(0) for m in _FALLBACK_SENTENCE.finditer(text)]
    for piece in pieces:
        piece = piece.strip()
        if not piece:
            continue
        start = text.find(piece, cursor)
        if start < 0:  # the segmenter altered the text: fall back for the remainder
            spans.extend(_fallback_spans(text, cursor))
            return spans
        spans.append(CharSpan(start=start, end=start + len(piece)))
        cursor = start + len(piece)
    return spans


def _fallback_spans(text: str, offset: int) -> list[CharSpan]:
    spans = []
    for m in _FALLBACK_SENTENCE.finditer(text, offset):
        seg = m.group(0)
        stripped = seg.strip()
        if stripped:
            start = m.start() + (len(seg) - len(seg.lstrip()))
            spans.append(CharSpan(start=start, end=start + len(stripped)))
    return spans


def build_sources(documents: Iterable[Document]) -> tuple[list[Source], list[Source]]:
    """Document-level sources and sentence-level sources (each sentence knows its document)."""
    doc_sources: list[Source] = []
    sentence_sources: list[Source] = []
    for i, doc in enumerate(documents):
        doc_sources.append(Source(kind="document", doc_index=i, span=CharSpan(start=0, end=len(doc.text)), text=doc.text))
        for span in split_sentences(doc.text):
            sentence_sources.append(
                Source(kind="sentence", doc_index=i, span=span, text=doc.text[span.start : span.end])
            )
    return doc_sources, sentence_sources
