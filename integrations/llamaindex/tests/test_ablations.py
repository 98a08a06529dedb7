"""`ablations=k` through AT2NodePostprocessor and AT2CitationQueryEngine: real BM25 retrieval, real model.

Groundedness is measured (the default) in every call here: one pass with every node removed. `ablations=k` pays one
pass per mask that is not already measured (every node kept: the run itself; every node removed: the measured
pass), counted by `expected_passes`."""

from __future__ import annotations

import pytest
from conftest import PENICILLIN
from pydantic import ValidationError

MAX_NEW = 12


@pytest.fixture(scope="module")
def retrieved(bm25):
    return bm25.retrieve(PENICILLIN)[:3]


def _scores(nodes):
    return {n.node.node_id: n.score for n in nodes}


def expected_passes(attribution, k: int) -> int:
    """The measured pass plus the ablation passes of `ablations=k` on this single-turn attribution."""
    from at2_rag.evidence.ablations import choose_masks

    masks = choose_masks(len(attribution.documents), k, attribution.prompt + "\x00" + attribution.answer).tolist()
    return 1 + sum(1 for m in masks if any(m) and not all(m))


def test_postprocessor_ablations(attributor, retrieved):
    from llama_index.postprocessor.at2 import AT2NodePostprocessor

    default = AT2NodePostprocessor(attributor, max_new_tokens=MAX_NEW)
    zero = AT2NodePostprocessor(attributor, max_new_tokens=MAX_NEW, ablations=0)
    two = AT2NodePostprocessor(attributor, max_new_tokens=MAX_NEW, ablations=2)
    assert default.ablations == 0 and two.to_dict()["ablations"] == 2
    out_default = default.postprocess_nodes(retrieved, query_str=PENICILLIN)
    out_zero = zero.postprocess_nodes(retrieved, query_str=PENICILLIN)
    out_two = two.postprocess_nodes(retrieved, query_str=PENICILLIN)
    assert default.last_attribution.extra_forward_passes == zero.last_attribution.extra_forward_passes == 1
    assert [(n.node.node_id, n.score) for n in out_default] == [(n.node.node_id, n.score) for n in out_zero]
    assert [n.node.metadata for n in out_default] == [n.node.metadata for n in out_zero]
    assert two.last_attribution.extra_forward_passes == expected_passes(two.last_attribution, 2) > 1
    assert two.last_attribution.answer == default.last_attribution.answer
    assert _scores(out_two) == pytest.approx(two.last_attribution.document_scores())
    assert _scores(out_two) != _scores(out_default)
    assert all(n.node.metadata["at2_score"] == n.score for n in out_two)
    # one node has only 2 distinct masks: k is capped, and both are already measured (the run; the measured pass)
    capped = AT2NodePostprocessor(attributor, max_new_tokens=MAX_NEW, ablations=5)
    capped.postprocess_nodes(retrieved[:1], query_str=PENICILLIN)
    assert capped.last_attribution.extra_forward_passes == 1
    capped.groundedness = "off"  # without the measured pass, the every-node-removed mask is an ablation pass
    capped.postprocess_nodes(retrieved[:1], query_str=PENICILLIN)
    assert capped.last_attribution.extra_forward_passes == 1 and capped.last_attribution.groundedness == "off"


def test_query_engine_ablations(attributor, bm25, retrieved):
    from llama_index.core.retrievers import BaseRetriever

    from llama_index.postprocessor.at2 import AT2CitationQueryEngine

    class Fixed(BaseRetriever):
        def _retrieve(self, query_bundle):
            return list(retrieved)

    def engine(**kwargs):
        return AT2CitationQueryEngine.from_args(Fixed(), attributor=attributor, max_new_tokens=MAX_NEW, **kwargs)

    default = engine().query(PENICILLIN)
    zero = engine(ablations=0).query(PENICILLIN)
    two = engine(ablations=2).query(PENICILLIN)
    assert default.metadata["at2"]["extra_forward_passes"] == 1  # the measured pass
    assert zero.metadata["at2"] == default.metadata["at2"]
    assert zero.metadata["citations"] == default.metadata["citations"]
    at2 = two.metadata["at2"]
    assert two.response == default.response
    assert at2["extra_forward_passes"] == two.metadata["attribution"].extra_forward_passes
    assert at2["extra_forward_passes"] == expected_passes(two.metadata["attribution"], 2) > 1
    refined = {d["id"]: d["score"] for d in at2["documents"]}
    assert refined != {d["id"]: d["score"] for d in default.metadata["at2"]["documents"]}
    assert _scores(two.source_nodes) == pytest.approx(refined)
    assert sorted(refined, key=refined.get, reverse=True) == [n.node.node_id for n in two.source_nodes]
    # streaming: the same refined attribution once the stream is consumed
    streaming = engine(ablations=2, streaming=True).query(PENICILLIN)
    assert "".join(streaming.response_gen) == two.response
    assert streaming.metadata["at2"] == at2


def test_bad_ablations_are_validation_errors(attributor, bm25):
    from llama_index.postprocessor.at2 import AT2CitationQueryEngine, AT2NodePostprocessor

    for bad in (-1, True, 1.5, "2"):
        with pytest.raises(ValidationError, match="ablations"):
            AT2NodePostprocessor(attributor, ablations=bad)
        with pytest.raises(ValidationError, match="ablations"):
            AT2CitationQueryEngine.from_args(bm25, attributor=attributor, ablations=bad)
