"""response_metadata["at2"] -> standard Citation annotations, stop sequences in streams."""

from __future__ import annotations

from langchain_core.messages import AIMessage, AIMessageChunk

from langchain_at2.annotations import citation_annotations
from langchain_at2.chat_models.base import _StopFilter

AT2 = {
    "scores": {"a": 0.3, "b": 0.01},
    "documents": [
        {"id": "a", "index": 0, "title": "Alpha", "url": "https://a", "score": 0.3},
        {"id": "b", "index": 1, "title": None, "url": None, "score": 0.01},
    ],
    "citations": [
        {
            "text": "Alpha is first.",
            "start": 0,
            "end": 15,
            "cited": ["a"],
            "supported": True,
            "grounded": 3.5,
            "context": [{"key": "history:1", "score": 0.02}],
            "documents": [
                {"id": "a", "score": 0.3, "cited_text": "Alpha comes first."},
                {"id": "b", "score": 0.01, "cited_text": "Beta."},
            ],
        },
        {"text": "Maybe.", "start": 16, "end": 22, "cited": [], "supported": False, "documents": []},
    ],
    "supported": True,
}


def test_citation_annotations() -> None:
    (citation,) = citation_annotations(AT2)
    assert citation == {
        "type": "citation",
        "id": "at2-0-0",
        "start_index": 0,
        "end_index": 15,
        "title": "Alpha",
        "url": "https://a",
        "cited_text": "Alpha comes first.",
        "extras": {
            "document_id": "a",
            "document_index": 0,
            "score": 0.3,
            "grounded": 3.5,
            "context": [{"key": "history:1", "score": 0.02}],
        },
    }
    # metadata written before `grounded` / `context` existed: the extras they had
    old = {**AT2, "citations": [{k: v for k, v in AT2["citations"][0].items() if k not in ("grounded", "context")}]}
    (citation,) = citation_annotations(old)
    assert citation["extras"] == {"document_id": "a", "document_index": 0, "score": 0.3}


def test_content_blocks_of_message_and_stream() -> None:
    import langchain_at2  # noqa: F401  (registers the translator)

    meta = {"model_provider": "at2", "at2": AT2}
    msg = AIMessage(content="Alpha is first. Maybe.", response_metadata=meta)
    (block,) = msg.content_blocks
    assert block["type"] == "text" and block["text"] == msg.content
    assert [a["extras"]["document_id"] for a in block["annotations"]] == ["a"]
    # no at2 metadata: a plain text block
    assert AIMessage(content="hi", response_metadata={"model_provider": "at2"}).content_blocks == [
        {"type": "text", "text": "hi"}
    ]
    # a stream: text chunks, then an empty last chunk that carries the attribution
    chunks = [
        AIMessageChunk(content="Alpha is first.", response_metadata={"model_provider": "at2"}),
        AIMessageChunk(content=" Maybe.", response_metadata={"model_provider": "at2"}),
        AIMessageChunk(content="", response_metadata=meta, chunk_position="last"),
    ]
    full = chunks[0] + chunks[1] + chunks[2]
    (block,) = full.content_blocks
    assert block["text"] == "Alpha is first. Maybe." and len(block["annotations"]) == 1


def test_stop_filter_holds_back_partial_stops() -> None:
    f = _StopFilter(["STOP", "\n\n"])
    out = [f.push(p) for p in ["Hello S", "T", "ill here", "\n", "more", "ST", "OP after"]]
    assert "".join(out) + f.flush() == "Hello STill here\nmore"
    assert out[0] == "Hello " and out[1] == ""
    g = _StopFilter([])
    assert g.push("abc") == "abc" and g.flush() == ""
    h = _StopFilter(["xyz"])
    assert h.push("abx") == "ab" and h.flush() == "x"
