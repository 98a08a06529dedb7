"""AT2CitationQueryEngine end to end: real index / retriever, real embedded model."""

from __future__ import annotations

import pytest
from conftest import PENICILLIN
from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse

MAX_NEW = 32
EVEREST = "Who made the first confirmed ascent of Mount Everest?"


@pytest.fixture(scope="module")
def engine(attributor, vector_index):
    from llama_index.postprocessor.at2 import AT2CitationQueryEngine

    return AT2CitationQueryEngine.from_args(
        vector_index, attributor=attributor, similarity_top_k=4, max_new_tokens=MAX_NEW
    )


@pytest.fixture(scope="module")
def response(engine):
    return engine.query(PENICILLIN)


def check_response(response, node_text, retrieved_ids=None):
    meta = response.metadata
    attribution = meta["attribution"]
    at2 = meta["at2"]
    assert response.response == attribution.answer and response.response.strip()
    # metadata["at2"] is the core's one serialisation, nothing re-serialised here
    assert at2 == attribution.to_dict() and at2["schema"] == "at2-rag/attribution"
    assert meta["citations"] is at2["citations"]
    ids = [n.node.node_id for n in response.source_nodes]
    if retrieved_ids is not None:
        assert sorted(ids) == sorted(retrieved_ids)
    # source_nodes: ranked by AT2; score = AT2 score; retrieval score kept in metadata
    scores = [n.score for n in response.source_nodes]
    assert scores == sorted(scores, reverse=True)
    doc_scores = {d["id"]: d["score"] for d in at2["documents"]}
    for rank, n in enumerate(response.source_nodes, 1):
        assert n.node.metadata["at2_document_id"] == n.node.node_id
        assert n.score == n.node.metadata["at2_score"] == doc_scores[n.node.node_id]
        assert n.node.metadata["at2_rank"] == rank
        assert isinstance(n.node.metadata["retrieval_score"], float)
        for s in n.node.metadata["at2_sentences"]:
            assert node_text[n.node.node_id][s["start"] : s["end"]] == s["text"]
    assert sorted(doc_scores) == sorted(ids)
    # citations: per answer sentence, spans in the answer, supporting sentences as spans in node text
    citations = meta["citations"]
    assert citations
    for c in citations:
        assert response.response[c["start"] : c["end"]] == c["text"]
        assert set(c["cited"]) <= set(ids)
        assert c["supported"] == bool(c["cited"])
        assert {d["id"] for d in c["documents"]} == set(ids)
        for d in c["documents"]:
            text = node_text[d["id"]]
            for s in d["sentences"]:
                assert text[s["start"] : s["end"]] == s["text"]
    assert any(c["cited"] for c in citations)
    assert meta["at2_complete"] is True
    assert meta["cited_answer"].startswith(response.response[: citations[0]["end"]])


def test_query_with_vector_index(response, node_text, vector_index):
    assert isinstance(response, Response)
    retrieved = [n.node.node_id for n in vector_index.as_retriever(similarity_top_k=4).retrieve(PENICILLIN)]
    check_response(response, node_text, retrieved)
    assert response.source_nodes[0].node.node_id in ("penicillin-0", retrieved[0]) or "penicillin-0" in [
        n.node.node_id for n in response.source_nodes[:2]
    ]


def test_query_with_bm25_retriever(attributor, bm25, node_text):
    from llama_index.postprocessor.at2 import AT2CitationQueryEngine

    engine = AT2CitationQueryEngine.from_args(bm25, attributor=attributor, max_new_tokens=MAX_NEW)
    response = engine.query(EVEREST)
    check_response(response, node_text, [n.node.node_id for n in bm25.retrieve(EVEREST)])
    assert "mount_everest-0" in [n.node.node_id for n in response.source_nodes]


def test_streaming_fills_attribution_after_the_stream(attributor, vector_index, response, node_text):
    from llama_index.postprocessor.at2 import AT2CitationQueryEngine

    engine = AT2CitationQueryEngine.from_args(
        vector_index, attributor=attributor, similarity_top_k=4, max_new_tokens=MAX_NEW, streaming=True
    )
    streaming = engine.query(PENICILLIN)
    assert isinstance(streaming, StreamingResponse)
    assert streaming.metadata["at2_complete"] is False and streaming.metadata["at2"] is None
    chunks = list(streaming.response_gen)
    assert len(chunks) > 1
    assert "".join(chunks) == response.response  # greedy: same answer as the non-streaming engine
    assert streaming.metadata["at2_complete"] is True
    final = Response("".join(chunks), streaming.source_nodes, streaming.metadata)
    check_response(final, node_text)
    assert [n.score for n in streaming.source_nodes] == pytest.approx(
        [n.score for n in response.source_nodes], abs=1e-4
    )


@pytest.mark.asyncio
async def test_aquery(engine, response, node_text):
    out = await engine.aquery(PENICILLIN)
    assert isinstance(out, Response)
    assert out.response == response.response
    check_response(out, node_text)


@pytest.mark.asyncio
async def test_aquery_streaming(attributor, vector_index, response, node_text):
    from llama_index.postprocessor.at2 import AT2CitationQueryEngine

    engine = AT2CitationQueryEngine.from_args(
        vector_index, attributor=attributor, similarity_top_k=4, max_new_tokens=MAX_NEW, streaming=True
    )
    out = await engine.aquery(PENICILLIN)
    assert isinstance(out, AsyncStreamingResponse)
    chunks = [c async for c in out.async_response_gen()]
    assert "".join(chunks) == response.response
    final = await out.get_response()
    check_response(final, node_text)


def test_no_nodes_gives_empty_response(attributor, vector_index):
    from llama_index.core.postprocessor import SimilarityPostprocessor

    from llama_index.postprocessor.at2 import AT2CitationQueryEngine

    engine = AT2CitationQueryEngine.from_args(
        vector_index,
        attributor=attributor,
        node_postprocessors=[SimilarityPostprocessor(similarity_cutoff=1.01)],  # cosine <= 1: drops every node
    )
    out = engine.query(PENICILLIN)
    assert out.response == "Empty Response" and out.source_nodes == [] and out.metadata["citations"] == []


def test_from_args_rejects_other_objects():
    from llama_index.postprocessor.at2 import AT2CitationQueryEngine

    with pytest.raises(TypeError, match="index or BaseRetriever"):
        AT2CitationQueryEngine.from_args("not an index")


def test_a_node_retrieved_twice_is_one_document(attributor, bm25, node_text):
    """A fusion-style retriever returning a node twice: one document, one source node, annotated."""
    from llama_index.core.retrievers import BaseRetriever

    from llama_index.postprocessor.at2 import AT2CitationQueryEngine

    retrieved = bm25.retrieve(PENICILLIN)[:3]

    class Twice(BaseRetriever):
        def _retrieve(self, query_bundle):
            return list(retrieved) + [retrieved[0]]

    response = AT2CitationQueryEngine.from_args(Twice(), attributor=attributor, max_new_tokens=12).query(PENICILLIN)
    assert sorted(n.node.node_id for n in response.source_nodes) == sorted(n.node.node_id for n in retrieved)
    assert len(response.metadata["at2"]["documents"]) == 3
    check_response(response, node_text)
