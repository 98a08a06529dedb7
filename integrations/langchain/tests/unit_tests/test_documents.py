from __future__ import annotations

import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from at2_rag import Document as AT2Document
from at2_rag import InvalidInputError, map_documents
from langchain_at2 import document_blocks, documents_message, extract_documents, rag_messages, to_at2_documents
from langchain_at2.documents import convert_documents, to_at2_document


def test_langchain_document_fields() -> None:
    doc = Document(page_content="Bees dance.", id="bees", metadata={"title": "Bees", "source": "https://x/bees"})
    out = to_at2_document(doc, 4)
    assert (out.text, out.id, out.title, out.url) == ("Bees dance.", "bees", "Bees", "https://x/bees")
    assert out.metadata["source"] == "https://x/bees"
    # id falls back to metadata["id"], then to the position
    assert to_at2_document(Document(page_content="t", metadata={"id": 7}), 0).id == "7"
    assert to_at2_document(Document(page_content="t"), 3).id == "doc3"


def test_other_inputs() -> None:
    assert to_at2_document("plain text", 1).id == "doc1"
    assert to_at2_document({"page_content": "x", "id": "a", "metadata": {"title": "T"}}, 0).title == "T"
    assert to_at2_document(AT2Document(text="y"), 2).id == "doc2"
    with pytest.raises(InvalidInputError, match="document 0 has type int"):
        to_at2_document(42, 0)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="must be a list"):
        to_at2_documents("not a list")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="must be a list"):
        to_at2_documents(Document(page_content="a bare document"))  # type: ignore[arg-type]
    assert issubclass(InvalidInputError, ValueError)
    assert convert_documents([]) == ([], [])


def test_duplicates_are_merged_and_clashing_ids_renamed() -> None:
    a = Document(page_content="same", id="a")
    docs, ids = convert_documents([a, a, Document(page_content="other", id="a"), "free"])
    assert [d.id for d in docs] == ["a", "a#2", "doc3"]
    assert ids == ["a", "a", "a#2", "doc3"]
    # the core's one policy, not a copy of it: the same result as at2_rag.map_documents
    mapped = map_documents([a, a, Document(page_content="other", id="a"), "free"])
    assert (docs, ids) == (mapped.documents, mapped.ids)


def test_blocks_round_trip() -> None:
    docs = [
        Document(page_content="Alpha text.", id="alpha", metadata={"title": "Alpha", "url": "https://a"}),
        "Beta text.",
    ]
    blocks = document_blocks(docs)
    assert blocks[0].pop("id").startswith("lc_")  # create_plaintext_block gives every block an id
    assert blocks[0] == {
        "type": "text-plain",
        "mime_type": "text/plain",
        "text": "Alpha text.",
        "extras": {"document_id": "alpha"},
        "title": "Alpha",
        "url": "https://a",
    }
    back = to_at2_documents(blocks)
    assert [(d.id, d.text, d.title) for d in back] == [("alpha", "Alpha text.", "Alpha"), ("doc1", "Beta text.", None)]


def test_documents_message_and_extraction() -> None:
    msg = documents_message("What is alpha?", [Document(page_content="Alpha text.", id="alpha")])
    assert msg.text == "What is alpha?"  # the documents are not text blocks
    messages = rag_messages("Q?", ["d1"], system="Be brief.", history=[HumanMessage("hi"), AIMessage("hello")])
    assert [m.type for m in messages] == ["system", "human", "ai", "human"]

    extra = HumanMessage("Second?", additional_kwargs={"documents": [Document(page_content="Beta", id="beta")], "k": 1})
    cleaned, found = extract_documents([SystemMessage("sys"), msg, extra])
    assert [to_at2_document(d, i).id for i, d in enumerate(found)] == ["alpha", "beta"]
    assert cleaned[1].content == [{"type": "text", "text": "What is alpha?"}]
    assert cleaned[2].additional_kwargs == {"k": 1}
    assert cleaned[0] is not None and cleaned[0].content == "sys"
