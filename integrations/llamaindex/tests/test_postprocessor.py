"""AT2NodePostprocessor on real retrieved nodes with the real embedded model."""

from __future__ import annotations

import pytest
from conftest import PENICILLIN
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

MAX_NEW = 24


@pytest.fixture(scope="module")
def retrieved(bm25):
    return bm25.retrieve(PENICILLIN)


@pytest.fixture(scope="module")
def reranked(attributor, retrieved):
    from llama_index.postprocessor.at2 import AT2NodePostprocessor

    pp = AT2NodePostprocessor(attributor, mode="rerank", max_new_tokens=MAX_NEW)
    return pp, pp.postprocess_nodes(retrieved, query_str=PENICILLIN)


def test_rerank_scores_are_the_core_attribution(attributor, retrieved, reranked):
    from at2_rag import map_documents

    pp, out = reranked
    assert len(out) == len(retrieved)
    direct = attributor.generate(PENICILLIN, map_documents(retrieved).documents, max_new_tokens=MAX_NEW)
    assert pp.last_attribution.answer == direct.answer
    for n in out:
        assert n.score == pytest.approx(direct.document(n.node.node_id).score, abs=1e-5)
    scores = [n.score for n in out]
    assert scores == sorted(scores, reverse=True)
    assert [n.node.metadata["at2_rank"] for n in out] == list(range(1, len(out) + 1))


def test_metadata_keeps_retrieval_score_and_hides_at2_keys(retrieved, reranked, node_text):
    _, out = reranked
    by_id = {n.node.node_id: n for n in retrieved}
    for n in out:
        meta = n.node.metadata
        assert meta["retrieval_score"] == by_id[n.node.node_id].score
        assert meta["at2_score"] == n.score
        assert meta["title"]  # the node's own metadata is kept
        # what a synthesizer / embedder sees is unchanged by the annotation
        for mode in (MetadataMode.LLM, MetadataMode.EMBED):
            assert n.node.get_content(mode) == by_id[n.node.node_id].node.get_content(mode)
            assert "at2_score" not in n.node.get_content(mode)
        text = node_text[n.node.node_id]
        for s in meta["at2_sentences"]:
            assert text[s["start"] : s["end"]] == s["text"]
        # the retriever's node objects are not modified
        assert "at2_score" not in by_id[n.node.node_id].node.metadata


def test_answer_node_ranks_high(reranked):
    _, out = reranked
    assert "penicillin-0" in [n.node.node_id for n in out[:2]]


def test_filter_prunes_and_keeps_retriever_order(attributor, retrieved, reranked):
    from llama_index.postprocessor.at2 import AT2NodePostprocessor

    _, annotated = reranked
    order = [n.node.node_id for n in retrieved]
    pp = AT2NodePostprocessor(attributor, mode="filter", top_k=2)
    kept = pp.select(annotated)
    assert len(kept) == 2
    assert {n.node.node_id for n in kept} == {n.node.node_id for n in annotated[:2]}
    assert [n.node.node_id for n in kept] == [i for i in order if i in {n.node.node_id for n in kept}]

    best = annotated[0].score
    rel = AT2NodePostprocessor(attributor, mode="rerank", relative_threshold=0.999).select(annotated)
    assert [n.node.node_id for n in rel] == [annotated[0].node.node_id]
    none = AT2NodePostprocessor(attributor, mode="filter", threshold=best + 1.0).select(annotated)
    assert len(none) == 1  # min_keep=1: never an empty context
    empty = AT2NodePostprocessor(attributor, mode="filter", threshold=best + 1.0, min_keep=0).select(annotated)
    assert empty == []
    default = AT2NodePostprocessor(attributor, mode="filter").select(annotated)  # support threshold
    assert all(n.score >= attributor.support_threshold for n in default) or len(default) == 1


def test_duplicate_nodes_are_scored_once(attributor, retrieved, reranked):
    from llama_index.postprocessor.at2 import AT2NodePostprocessor

    pp = AT2NodePostprocessor(attributor, max_new_tokens=MAX_NEW)
    out = pp.postprocess_nodes(list(retrieved) + [retrieved[0]], query_bundle=QueryBundle(PENICILLIN))
    assert sorted(n.node.node_id for n in out) == sorted(n.node.node_id for n in retrieved)
    assert [n.score for n in out] == pytest.approx([n.score for n in reranked[1]], abs=1e-5)


@pytest.mark.asyncio
async def test_async_matches_sync(attributor, retrieved, reranked):
    from llama_index.postprocessor.at2 import AT2NodePostprocessor

    pp = AT2NodePostprocessor(attributor, mode="rerank", max_new_tokens=MAX_NEW)
    out = await pp.apostprocess_nodes(retrieved, query_str=PENICILLIN)
    assert [n.node.node_id for n in out] == [n.node.node_id for n in reranked[1]]


def test_in_a_standard_query_engine(attributor, vector_index):
    """Context pruning in LlamaIndex's own query engine: the synthesizer (AT2LLM) sees only the kept node."""
    from llama_index.postprocessor.at2 import AT2LLM, AT2NodePostprocessor

    engine = vector_index.as_query_engine(
        similarity_top_k=4,
        llm=AT2LLM(attributor, max_new_tokens=16),
        node_postprocessors=[AT2NodePostprocessor(attributor, mode="filter", top_k=1, max_new_tokens=MAX_NEW)],
    )
    response = engine.query(PENICILLIN)
    assert response.response and response.response.strip()
    assert len(response.source_nodes) == 1
    node = response.source_nodes[0]
    assert node.score == node.node.metadata["at2_score"]
    assert isinstance(node.node.metadata["retrieval_score"], float)
    assert isinstance(node, NodeWithScore)


def test_same_id_with_other_text_is_kept_as_a_second_document(attributor, retrieved):
    """The core's one policy (`at2_rag.map_documents`): chunks sharing an id with other text are all scored, the
    later one as `id#2`; each returned node says which at2 document it is."""
    from llama_index.core.schema import TextNode

    from at2_rag import map_documents
    from llama_index.postprocessor.at2 import AT2NodePostprocessor
    from llama_index.postprocessor.at2._common import unique_nodes

    first, other = retrieved[0], retrieved[1]
    clash = NodeWithScore(
        node=TextNode(text=other.node.text, id_=first.node.node_id, metadata={"title": "Clash"}), score=0.5
    )
    nodes = [first, clash, first]  # first repeated (merged), clash renamed
    assert map_documents(nodes).ids == [first.node.node_id, first.node.node_id + "#2", first.node.node_id]
    assert unique_nodes(nodes) == [first, clash]
    pp = AT2NodePostprocessor(attributor, max_new_tokens=MAX_NEW)
    out = pp.postprocess_nodes(nodes, query_str=PENICILLIN)
    assert len(out) == 2 and all(n.node.node_id == first.node.node_id for n in out)
    by_doc = {n.node.metadata["at2_document_id"]: n for n in out}
    assert set(by_doc) == {first.node.node_id, first.node.node_id + "#2"}
    assert by_doc[first.node.node_id + "#2"].node.text == other.node.text
    for doc_id, n in by_doc.items():
        assert n.score == pp.last_attribution.document(doc_id).score
