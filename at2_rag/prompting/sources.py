"""Documents and the sources inside them (whole documents and their sentences), with exact char offsets."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InvalidInputError, NoDocumentsError

logger = logging.getLogger(__name__)


class Document(BaseModel):
    """A retrieved document. `id` is what scores are keyed by; `title`/`url` are shown in citations."""

    model_config = ConfigDict(frozen=True)

    text: str
    id: str | None = None
    title: str | None = None
    url: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


#: what `to_document` accepts (framework objects are duck-typed, never imported)
DocumentLike = Document | str | Mapping[str, Any] | Any


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


#: metadata keys read, in order, for a document's title and url (LangChain, LlamaIndex and file loaders' names)
TITLE_KEYS = ("title", "file_name", "filename")
URL_KEYS = ("url", "source", "file_path")
#: LangChain's standard content block for a citable plain-text document
TEXT_PLAIN_BLOCK = "text-plain"


def _first_str(*values: Any) -> str | None:
    for value in values:
        if isinstance(value, str) and value.strip():
            return value
    return None


def _meta_str(meta: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    return _first_str(*(meta.get(k) for k in keys))


def _metadata_id(meta: Mapping[str, Any]) -> str | None:
    """A framework's `metadata["id"]` may be a number; it is still the document's id."""
    value = meta.get("id")
    return None if value is None or isinstance(value, bool) else str(value)


def _from_fields(index: int, text: Any, id: Any, metadata: Any, title: Any = None, url: Any = None) -> Document:
    meta = dict(metadata) if isinstance(metadata, Mapping) else {}
    data: dict[str, Any] = {
        "text": text,
        "id": id if id is not None else _metadata_id(meta),
        "title": _first_str(title) or _meta_str(meta, TITLE_KEYS),
        "url": _first_str(url) or _meta_str(meta, URL_KEYS),
        "metadata": meta,
    }
    try:
        return Document(**data)
    except ValidationError as exc:  # e.g. non-string text or id: one of our errors, naming the document
        raise InvalidInputError(f"document {index} is not a valid document: {exc}") from exc


def context_key(kind: str, index: int | None) -> str:
    """`history:0`, `system`, `query`: how a context source is named in `Attribution.context_scores()`."""
    return f"{kind}:{index}" if index is not None else kind


class UnlocatedDocument(BaseModel):
    """A document that was given but could not be found in the prompt (see `Attributor.attribute_rendered`),
    so it has no score: `position` is its index in the caller's list, `reason` says why."""

    model_config = ConfigDict(frozen=True)

    position: int
    id: str
    title: str | None = None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "position": self.position, "reason": self.reason}


def to_document(item: Any, index: int) -> Document:
    """One document from what a user or a framework holds; `index` names it in errors and default ids (`doc{index}`).

    Accepted: an at2_rag `Document`; a string; a mapping with `text` (or `page_content`), optional `id`, `title`,
    `url`, `metadata`; a LangChain `text-plain` content block (id from `extras["document_id"]`); a LangChain
    `Document` (`page_content`, `id` else `metadata["id"]`); a LlamaIndex node or `NodeWithScore` (text without
    metadata, `node_id`). Title and url fall back to the metadata keys in `TITLE_KEYS` / `URL_KEYS`.
    """
    if isinstance(item, Document):
        doc = item
    elif isinstance(item, str):
        doc = Document(text=item)
    elif isinstance(item, Mapping):
        data = dict(item)
        if data.get("type") == TEXT_PLAIN_BLOCK:
            extras = dict(data.get("extras") or {})
            if not isinstance(data.get("text"), str):
                raise InvalidInputError(
                    f"document {index} is a text-plain block without 'text' (base64, url or file_id documents "
                    "cannot be attributed)"
                )
            doc = _from_fields(
                index, data["text"], extras.pop("document_id", None) or data.get("id"),
                extras.get("metadata") or {}, data.get("title"), data.get("url"),
            )
        else:
            if "text" not in data and "page_content" in data:
                data["text"] = data.pop("page_content")
            if "text" not in data:
                raise InvalidInputError(
                    f"document {index} is a mapping without a 'text' key: keys are {sorted(map(str, data))}"
                )
            doc = _from_fields(
                index, data["text"], data.get("id"), data.get("metadata"), data.get("title"), data.get("url")
            )
    elif hasattr(item, "page_content") and hasattr(item, "metadata"):  # langchain_core.documents.Document
        doc = _from_fields(index, item.page_content, getattr(item, "id", None), item.metadata)
    elif hasattr(getattr(item, "node", None), "get_content") or (
        hasattr(item, "get_content") and hasattr(item, "node_id")
    ):  # llama_index NodeWithScore / BaseNode
        node = getattr(item, "node", item)
        doc = _from_fields(index, node.get_content(metadata_mode="none"), node.node_id, node.metadata)
    else:
        raise InvalidInputError(
            f"document {index} has type {type(item).__name__}; expected at2_rag.Document, str, a mapping with "
            "'text', a LangChain Document or content block, or a LlamaIndex node"
        )
    if not isinstance(doc.text, str):
        raise InvalidInputError(f"document {index} text must be a string, got {type(doc.text).__name__}")
    if doc.id is None:
        doc = doc.model_copy(update={"id": f"doc{index}"})
    return doc


class MappedDocuments(BaseModel):
    """The prompt's documents and, for every input item, the id of the document it became."""

    model_config = ConfigDict(frozen=True)

    documents: list[Document]
    ids: list[str]


def map_documents(items: Sequence[Any] | None) -> MappedDocuments:
    """Documents from user or framework input, with the one duplicate-id policy of at2-rag.

    The same id with the same text is one document (a fusion retriever returning a chunk twice): kept once, both
    inputs map to it. The same id with other text (chunks of one file sharing its id) keeps every chunk: the later
    ones get `id#2`, `id#3`, ... Refuses a bare document (not a list) and an empty list.
    """
    if items is None or isinstance(items, (str, Document, Mapping)) or not isinstance(items, Sequence):
        raise InvalidInputError("documents must be a list of documents (wrap a single document in a list)")
    documents: list[Document] = []
    ids: list[str] = []
    text_of: dict[str, str] = {}
    for i, item in enumerate(items):
        doc = to_document(item, i)
        assert doc.id is not None
        if doc.id in text_of:
            if text_of[doc.id] == doc.text:
                ids.append(doc.id)
                continue
            n = 2
            while f"{doc.id}#{n}" in text_of:
                n += 1
            logger.info("documents %r share an id with other text: the later one is %r", doc.id, f"{doc.id}#{n}")
            doc = doc.model_copy(update={"id": f"{doc.id}#{n}"})
        assert doc.id is not None
        text_of[doc.id] = doc.text
        documents.append(doc)
        ids.append(doc.id)
    if not documents:
        raise NoDocumentsError("no documents were given: attribution needs at least one document")
    return MappedDocuments(documents=documents, ids=ids)


def normalize_documents(documents: Sequence[Any] | None) -> list[Document]:
    """`map_documents(...).documents`: Documents with unique ids; refuses an empty list."""
    return map_documents(documents).documents


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
        whole = CharSpan(start=0, end=len(doc.text))
        doc_sources.append(Source(kind="document", doc_index=i, span=whole, text=doc.text))
        for span in split_sentences(doc.text):
            sentence_sources.append(
                Source(kind="sentence", doc_index=i, span=span, text=doc.text[span.start : span.end])
            )
    return doc_sources, sentence_sources
