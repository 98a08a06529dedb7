"""LangChain documents <-> at2-rag documents, and documents carried inside chat messages.

The mapping from LangChain objects to at2-rag `Document`s, and the duplicate-id policy, are the core's
(`at2_rag.to_document` / `at2_rag.map_documents`): the helpers here are thin, LangChain-named wrappers.

A chat model sees retrieved documents in one of three ways (see `ChatAT2`):

* explicitly: `model.invoke(messages, documents=docs)` or `model.bind(documents=docs)`;
* as LangChain v1 standard `text-plain` content blocks inside a message (the format LangChain uses for
  citable documents; build them with `document_blocks` / `documents_message`);
* as `message.additional_kwargs["documents"]` (a list of `Document`s, dicts or strings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.documents import Document
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from langchain_core.messages.content import PlainTextContentBlock, create_plaintext_block

from at2_rag import Document as AT2Document
from at2_rag import map_documents, to_document
from at2_rag.prompting.sources import TEXT_PLAIN_BLOCK

DocumentInput = Document | AT2Document | str | Mapping[str, Any]

DOCUMENT_BLOCK_TYPE = TEXT_PLAIN_BLOCK
DOCUMENTS_KWARG = "documents"


def to_at2_document(item: DocumentInput, index: int = 0) -> AT2Document:
    """One input as an at2-rag Document: `at2_rag.to_document` (raises `at2_rag.InvalidInputError`, a ValueError).

    LangChain `Document`: text = `page_content`; id = `doc.id`, else `metadata["id"]`, else `doc{index}`;
    title = `metadata["title"]`; url = `metadata["url"]`, else `metadata["source"]`; metadata is kept.
    A `text-plain` content block: text, title, url; id = `extras["document_id"]`, else the block id.
    """
    return to_document(item, index)


def convert_documents(items: Sequence[DocumentInput]) -> tuple[list[AT2Document], list[str]]:
    """`at2_rag.map_documents`: the documents, and the at2 document id of every input item.

    The core's duplicate-id policy: the same id with the same text is one document (both items map to it); the
    same id with other text keeps both, the later one renamed `id#2`, `id#3`, ... An empty list gives `([], [])`
    (the core refuses it: callers here report "no documents" themselves); a bare document (not a list) raises
    `at2_rag.InvalidInputError`.
    """
    if isinstance(items, Sequence) and not isinstance(items, (str, bytes)) and len(items) == 0:
        return [], []
    mapped = map_documents(items)
    return list(mapped.documents), list(mapped.ids)


def to_at2_documents(items: Sequence[DocumentInput]) -> list[AT2Document]:
    """`convert_documents(items)[0]`: the documents, with the core's duplicate-id policy applied."""
    return convert_documents(items)[0]


def document_blocks(documents: Sequence[DocumentInput]) -> list[PlainTextContentBlock]:
    """LangChain v1 `text-plain` content blocks (`create_plaintext_block`) for documents, with title, url and
    the document id (`extras["document_id"]`, what `to_at2_document` reads back)."""
    return [
        create_plaintext_block(doc.text, title=doc.title, url=doc.url, document_id=doc.id)
        for doc in to_at2_documents(documents)
    ]


def documents_message(question: str, documents: Sequence[DocumentInput]) -> HumanMessage:
    """A human turn carrying the documents as `text-plain` blocks followed by the question as text.

    `ChatAT2` renders such documents with its prompt template and attributes the answer to them; other chat
    models that understand standard content blocks see the same documents.
    """
    content: list[Any] = [*document_blocks(documents), {"type": "text", "text": question}]
    return HumanMessage(content=content)


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


def _is_document_block(block: Any) -> bool:
    return isinstance(block, dict) and block.get("type") == DOCUMENT_BLOCK_TYPE


def extract_documents(messages: Sequence[BaseMessage]) -> tuple[list[BaseMessage], list[Any]]:
    """Split documents out of messages: returns (messages without document blocks, documents in order).

    Collects `text-plain` blocks from every message's content and `additional_kwargs["documents"]`.
    """
    cleaned: list[BaseMessage] = []
    documents: list[Any] = []
    for message in messages:
        extra = message.additional_kwargs.get(DOCUMENTS_KWARG) if message.additional_kwargs else None
        blocks = [b for b in message.content if _is_document_block(b)] if isinstance(message.content, list) else []
        if not extra and not blocks:
            cleaned.append(message)
            continue
        update: dict[str, Any] = {}
        if blocks:
            documents.extend(blocks)
            update["content"] = [b for b in message.content if not _is_document_block(b)]
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
