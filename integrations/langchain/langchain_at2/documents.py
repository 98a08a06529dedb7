"""LangChain documents <-> at2-rag documents, and documents carried inside chat messages.

A chat model sees retrieved documents in one of three ways (see `ChatAT2`):

* explicitly: `model.invoke(messages, documents=docs)` or `model.bind(documents=docs)`;
* as LangChain v1 standard `text-plain` content blocks inside a message (the format LangChain uses for
  citable documents; build them with `document_blocks` / `documents_message`);
* as `message.additional_kwargs["documents"]` (a list of `Document`s, dicts or strings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

from at2_rag import Document as AT2Document
from langchain_core.documents import Document
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage

DocumentInput = Union[Document, AT2Document, str, Mapping[str, Any]]

DOCUMENT_BLOCK_TYPE = "text-plain"
DOCUMENTS_KWARG = "documents"


def _first_str(*values: Any) -> str | None:
    for value in values:
        if isinstance(value, str) and value:
            return value
    return None


def to_at2_document(item: DocumentInput, index: int = 0) -> AT2Document:
    """Convert one input to an at2-rag Document.

    LangChain `Document`: text = `page_content`; id = `doc.id`, else `metadata["id"]`, else `doc{index}`;
    title = `metadata["title"]`; url = `metadata["url"]`, else `metadata["source"]`; metadata is kept.
    A `text-plain` content block: text, title, url; id = `extras["document_id"]`, else the block id.
    """
    if isinstance(item, AT2Document):
        return item if item.id is not None else item.model_copy(update={"id": f"doc{index}"})
    if isinstance(item, Document):
        meta = dict(item.metadata or {})
        return AT2Document(
            text=item.page_content,
            id=_first_str(item.id, str(meta["id"]) if meta.get("id") is not None else None) or f"doc{index}",
            title=_first_str(meta.get("title")),
            url=_first_str(meta.get("url"), meta.get("source")),
            metadata=meta,
        )
    if isinstance(item, str):
        return AT2Document(text=item, id=f"doc{index}")
    if isinstance(item, Mapping):
        data = dict(item)
        if data.get("type") == DOCUMENT_BLOCK_TYPE:
            extras = dict(data.get("extras") or {})
            text = data.get("text")
            if not isinstance(text, str):
                raise ValueError(
                    f"document block {index} has no 'text' (base64, url or file_id documents cannot be attributed)"
                )
            return AT2Document(
                text=text,
                id=_first_str(extras.pop("document_id", None), data.get("id")) or f"doc{index}",
                title=_first_str(data.get("title")),
                url=_first_str(data.get("url")),
                metadata=extras.get("metadata") or {},
            )
        if "text" not in data and "page_content" in data:
            data["text"] = data.pop("page_content")
        meta = data.get("metadata") or {}
        return AT2Document(
            text=data.get("text"),
            id=_first_str(str(data["id"]) if data.get("id") is not None else None) or f"doc{index}",
            title=_first_str(data.get("title"), meta.get("title")),
            url=_first_str(data.get("url"), meta.get("url"), meta.get("source")),
            metadata=meta,
        )
    raise TypeError(
        f"document {index} has type {type(item).__name__}; expected a langchain Document, an at2_rag Document, "
        "a string, a dict with 'text'/'page_content', or a text-plain content block"
    )


def to_at2_documents(items: Sequence[DocumentInput]) -> list[AT2Document]:
    """Convert a list; identical documents (same id and text) are kept once, clashing ids get a `#n` suffix."""
    return convert_documents(items)[0]


def convert_documents(items: Sequence[DocumentInput]) -> tuple[list[AT2Document], list[str]]:
    """`to_at2_documents`, plus the at2 document id of every input item (duplicates share one)."""
    if isinstance(items, (str, Document, AT2Document)) or isinstance(items, Mapping):
        raise TypeError("documents must be a list of documents (wrap a single document in a list)")
    out: list[AT2Document] = []
    ids: list[str] = []
    seen: dict[str, str] = {}
    for i, item in enumerate(items):
        doc = to_at2_document(item, i)
        assert doc.id is not None
        if doc.id in seen:
            if seen[doc.id] == doc.text:
                ids.append(doc.id)
                continue
            n = 2
            while f"{doc.id}#{n}" in seen:
                n += 1
            doc = doc.model_copy(update={"id": f"{doc.id}#{n}"})
        assert doc.id is not None
        seen[doc.id] = doc.text
        out.append(doc)
        ids.append(doc.id)
    return out, ids


def document_blocks(documents: Sequence[DocumentInput]) -> list[dict[str, Any]]:
    """LangChain v1 `text-plain` content blocks for documents (title, url and document id preserved)."""
    blocks: list[dict[str, Any]] = []
    for doc in to_at2_documents(documents):
        block: dict[str, Any] = {
            "type": DOCUMENT_BLOCK_TYPE,
            "mime_type": "text/plain",
            "text": doc.text,
            "extras": {"document_id": doc.id},
        }
        if doc.title:
            block["title"] = doc.title
        if doc.url:
            block["url"] = doc.url
        blocks.append(block)
    return blocks


def documents_message(question: str, documents: Sequence[DocumentInput]) -> HumanMessage:
    """A human turn carrying the documents as `text-plain` blocks followed by the question as text.

    `ChatAT2` renders such documents with its prompt template and attributes the answer to them; other chat
    models that understand standard content blocks see the same documents.
    """
    return HumanMessage(content=[*document_blocks(documents), {"type": "text", "text": question}])


def rag_messages(
    question: str,
    documents: Sequence[DocumentInput],
    *,
    system: str | None = None,
    history: Sequence[BaseMessage] = (),
) -> list[BaseMessage]:
    """`[system?, *history, documents_message(question, documents)]`."""
    messages: list[BaseMessage] = [SystemMessage(system)] if system else []
    messages.extend(history)
    messages.append(documents_message(question, documents))
    return messages


def extract_documents(messages: Sequence[BaseMessage]) -> tuple[list[BaseMessage], list[Any]]:
    """Split documents out of messages: returns (messages without document blocks, documents in order).

    Collects `text-plain` blocks from every message's content and `additional_kwargs["documents"]`.
    """
    cleaned: list[BaseMessage] = []
    documents: list[Any] = []
    for message in messages:
        extra = message.additional_kwargs.get(DOCUMENTS_KWARG) if message.additional_kwargs else None
        blocks_found = isinstance(message.content, list) and any(
            isinstance(b, dict) and b.get("type") == DOCUMENT_BLOCK_TYPE for b in message.content
        )
        if not extra and not blocks_found:
            cleaned.append(message)
            continue
        update: dict[str, Any] = {}
        if blocks_found:
            content = [b for b in message.content if not (isinstance(b, dict) and b.get("type") == DOCUMENT_BLOCK_TYPE)]
            documents.extend(b for b in message.content if isinstance(b, dict) and b.get("type") == DOCUMENT_BLOCK_TYPE)
            update["content"] = content
        if extra:
            documents.extend(extra)
            update["additional_kwargs"] = {k: v for k, v in message.additional_kwargs.items() if k != DOCUMENTS_KWARG}
        cleaned.append(message.model_copy(update=update))
    return cleaned, documents


def to_langchain_document(doc: AT2Document, **extra_metadata: Any) -> Document:
    """A LangChain Document for an at2-rag document, with extra metadata merged in."""
    meta = {**doc.metadata, **extra_metadata}
    if doc.title and "title" not in meta:
        meta["title"] = doc.title
    return Document(page_content=doc.text, id=doc.id, metadata=meta)
