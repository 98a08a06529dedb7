"""response_metadata["at2"] (built from Attribution.to_dict()) -> standard Citation annotations; stop sequences."""

from __future__ import annotations

import json

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk

from at2_rag import Attribution
from at2_rag.attribution.result import (
    Citation,
    CitedDocument,
    ContextSource,
    DocumentScore,
    SentenceScore,
    UnlocatedDocument,
)
from langchain_at2 import attribution_from_metadata
from langchain_at2.annotations import LANGCHAIN_KEYS, attribution_metadata, citation_annotations, trace_summary
from langchain_at2.chat_models.base import _StopFilter

ANSWER = "Alpha is first. Maybe."
EARLIER = ContextSource(kind="history", index=1, role="assistant", text="Alpha, said before.", score=0.02)


def _attribution() -> Attribution:
    alpha = DocumentScore(
        index=0, id="a", title="Alpha", url="https://a", text="Alpha comes first. Then more.", score=0.3,
        sentences=[SentenceScore(text="Alpha comes first.", start=0, end=18, score=0.25)],
    )
    beta = DocumentScore(index=1, id="b", text="Beta.", score=0.01)
    return Attribution(
        query="What is first?",
        answer=ANSWER,
        prompt="<prompt>",
        documents=[alpha, beta],
        citations=[
            Citation(
                text="Alpha is first.", start=0, end=15, cited=["a"], supported=True, grounded=3.5, context=[EARLIER],
                context_grounded=1.25,
                documents=[
                    CitedDocument(index=0, id="a", title="Alpha", score=0.3, sentences=alpha.sentences),
                    CitedDocument(index=1, id="b", score=0.01),
                ],
            ),
            Citation(text="Maybe.", start=16, end=22, cited=[], supported=False, grounded=0.1, documents=[]),
        ],
        estimator="test",
        estimator_trained=True,
        support_threshold=0.0,
        supported=True,
        num_prompt_tokens=10,
        num_answer_tokens=6,
        unlocated_documents=[UnlocatedDocument(position=2, id="c", reason="does not occur in the prompt")],
        context_sources=[EARLIER, ContextSource(kind="query", role="user", text="What is first?", score=0.05)],
        extra_forward_passes=2,
        groundedness="measured",
    )


def test_metadata_is_to_dict_plus_langchain_keys() -> None:
    attribution = _attribution()
    at2 = attribution_metadata(attribution, mode="template")
    core = attribution.to_dict()
    assert {k: v for k, v in at2.items() if k not in LANGCHAIN_KEYS} == core  # no second serializer
    assert at2["schema"] == "at2-rag/attribution" and at2["schema_version"] == core["schema_version"]
    assert at2["mode"] == "template"
    assert at2["scores"] == attribution.document_scores() == {"a": 0.3, "b": 0.01}
    assert at2["context_scores"] == attribution.context_scores() == {"history:1": 0.02, "query": 0.05}
    assert json.loads(json.dumps(at2)) == at2  # JSON-ready, as response_metadata should be
    # round trip: the message's metadata gives the Attribution back
    msg = AIMessage(content=ANSWER, response_metadata={"model_provider": "at2", "at2": at2})
    assert attribution_from_metadata(msg) == attribution
    with pytest.raises(ValueError, match="no AT2 attribution"):
        attribution_from_metadata(AIMessage(content="x"))
    assert trace_summary(at2) == {
        "schema": "at2-rag/attribution",
        "schema_version": core["schema_version"],
        "scores": {"a": 0.3, "b": 0.01},
        "context_scores": {"history:1": 0.02, "query": 0.05},
        "supported": True,
        "groundedness": "measured",
        "extra_forward_passes": 2,
    }


def test_citation_annotations() -> None:
    at2 = attribution_metadata(_attribution(), mode="prompt")
    (citation,) = citation_annotations(at2)
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
            "supported": True,
            "context_grounded": 1.25,
            "groundedness": "measured",
            "context": [{"key": "history:1", "score": 0.02}],
        },
    }


def test_content_blocks_of_message_and_stream() -> None:
    import langchain_at2  # noqa: F401  (registers the translator)

    meta = {"model_provider": "at2", "at2": attribution_metadata(_attribution(), mode="template")}
    msg = AIMessage(content=ANSWER, response_metadata=meta)
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
    assert block["text"] == ANSWER and len(block["annotations"]) == 1
    assert attribution_from_metadata(full) == _attribution()


def test_stop_filter_holds_back_partial_stops() -> None:
    f = _StopFilter(["STOP", "\n\n"])
    out = [f.push(p) for p in ["Hello S", "T", "ill here", "\n", "more", "ST", "OP after"]]
    assert "".join(out) + f.flush() == "Hello STill here\nmore"
    assert out[0] == "Hello " and out[1] == ""
    g = _StopFilter([])
    assert g.push("abc") == "abc" and g.flush() == ""
    h = _StopFilter(["xyz"])
    assert h.push("abx") == "ab" and h.flush() == "x"
