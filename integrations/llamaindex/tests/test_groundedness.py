"""`groundedness` ("measured" by default, "estimated", "off") through AT2NodePostprocessor, AT2CitationQueryEngine
(also streaming) and `instrument_at2`: real BM25 retrieval, real llama-index-core engines, the real embedded model.

Measured groundedness pays one extra pass for a single-turn answer (every node removed) and one more in a
conversation (every earlier turn removed: `context_grounded`); "estimated" pays none; "off" gives `grounded` None."""

from __future__ import annotations

import pytest
from conftest import PENICILLIN, ExtractiveLLM
from pydantic import ValidationError

MAX_NEW = 12


@pytest.fixture(scope="module")
def retrieved(bm25):
    return bm25.retrieve(PENICILLIN)[:3]


def check_mode(data: dict, mode: str, passes: int, conversation: bool = False) -> None:
    """`data`: `Attribution.to_dict()` of an answer attributed in `mode`."""
    assert data["groundedness"] == mode and data["extra_forward_passes"] == passes
    assert data["citations"]
    for c in data["citations"]:
        if mode == "off":
            assert c["grounded"] is None and c["supported"] is True
        else:
            assert isinstance(c["grounded"], float)
            assert c["supported"] == (c["grounded"] >= data["grounded_threshold"])
        if conversation and mode == "measured":
            assert isinstance(c["context_grounded"], float)
        else:
            assert c["context_grounded"] is None


def test_postprocessor(attributor, retrieved):
    from llama_index.postprocessor.at2 import AT2NodePostprocessor

    default = AT2NodePostprocessor(attributor, max_new_tokens=MAX_NEW)
    assert default.groundedness == "measured" and default.to_dict()["groundedness"] == "measured"
    ranked = default.postprocess_nodes(retrieved, query_str=PENICILLIN)
    check_mode(default.last_attribution.to_dict(), "measured", 1)
    for mode in ("estimated", "off"):
        other = AT2NodePostprocessor(attributor, max_new_tokens=MAX_NEW, groundedness=mode)
        out = other.postprocess_nodes(retrieved, query_str=PENICILLIN)
        check_mode(other.last_attribution.to_dict(), mode, 0)
        # the setting changes `grounded`, not the node scores
        assert [(n.node.node_id, n.score) for n in out] == [(n.node.node_id, pytest.approx(n.score)) for n in ranked]
    for bad in ("exact", None, 1):
        with pytest.raises(ValidationError, match="groundedness"):
            AT2NodePostprocessor(attributor, groundedness=bad)


def test_query_engine(attributor, bm25, retrieved):
    from llama_index.core.retrievers import BaseRetriever

    from llama_index.postprocessor.at2 import AT2CitationQueryEngine

    class Fixed(BaseRetriever):
        def _retrieve(self, query_bundle):
            return list(retrieved)

    def engine(**kwargs):
        return AT2CitationQueryEngine.from_args(Fixed(), attributor=attributor, max_new_tokens=MAX_NEW, **kwargs)

    default = engine()
    assert default.groundedness == "measured"
    measured = default.query(PENICILLIN)
    check_mode(measured.metadata["at2"], "measured", 1)
    assert measured.metadata["citations"] == measured.metadata["at2"]["citations"]
    estimated = engine(groundedness="estimated").query(PENICILLIN)
    check_mode(estimated.metadata["at2"], "estimated", 0)
    assert estimated.response == measured.response
    # streaming: the stream's attribution takes the setting too
    streaming = engine(groundedness="off", streaming=True).query(PENICILLIN)
    assert "".join(streaming.response_gen) == measured.response
    check_mode(streaming.metadata["at2"], "off", 0)
    streaming = engine(streaming=True).query(PENICILLIN)
    assert "".join(streaming.response_gen) == measured.response
    check_mode(streaming.metadata["at2"], "measured", 1)
    got = [c["grounded"] for c in streaming.metadata["at2"]["citations"]]
    assert got == pytest.approx([c["grounded"] for c in measured.metadata["at2"]["citations"]], abs=1e-4)
    for bad in ("exact", None):
        with pytest.raises(ValidationError, match="groundedness"):
            AT2CitationQueryEngine.from_args(bm25, attributor=attributor, groundedness=bad)


def test_instrumentation(attributor, vector_index):
    from llama_index.core.chat_engine import ContextChatEngine
    from llama_index.core.llms import ChatMessage

    from at2_rag import InvalidInputError
    from llama_index.postprocessor.at2 import instrument_at2

    with pytest.raises(InvalidInputError, match="groundedness must be one of 'measured', 'estimated', 'off'"):
        instrument_at2(attributor, groundedness="exact")
    at2 = instrument_at2(attributor)
    try:
        assert at2.groundedness == "measured"
        assert instrument_at2(attributor, groundedness="measured") is at2  # the same settings: reused
        with pytest.raises(RuntimeError, match="uninstrument"):
            instrument_at2(attributor, groundedness="estimated")  # other settings: not silently reused
        response = vector_index.as_query_engine(llm=ExtractiveLLM(), similarity_top_k=2).query(PENICILLIN)
        check_mode(response.metadata["at2"], "measured", 1)
        # a chat engine's second turn: its earlier turns are measured too
        chat = ContextChatEngine.from_defaults(
            retriever=vector_index.as_retriever(similarity_top_k=2),
            llm=ExtractiveLLM(chat_model=True),
            chat_history=[ChatMessage(role="user", content="Hello."), ChatMessage(role="assistant", content="Hi.")],
        )
        answer = chat.chat(PENICILLIN)
        check_mode(answer.metadata["at2"], "measured", 2, conversation=True)
    finally:
        at2.uninstrument()
    estimated = instrument_at2(attributor, groundedness="estimated")
    try:
        assert estimated is not at2 and estimated.groundedness == "estimated"
        response = vector_index.as_query_engine(llm=ExtractiveLLM(), similarity_top_k=2).query(PENICILLIN)
        check_mode(response.metadata["at2"], "estimated", 0)
    finally:
        estimated.uninstrument()
