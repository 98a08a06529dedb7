"""Shared pieces: the default attributor, LlamaIndex nodes <-> at2-rag documents, annotated nodes, citations."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence

from llama_index.core.schema import MetadataMode, NodeWithScore

# Keys this package writes into a returned node's metadata. They are excluded from the text the LLM and the
# embedding model see, so a downstream synthesizer's context is unchanged.
AT2_SCORE_KEY = "at2_score"
RETRIEVAL_SCORE_KEY = "retrieval_score"
AT2_RANK_KEY = "at2_rank"
AT2_SENTENCES_KEY = "at2_sentences"
AT2_METADATA_KEYS = (AT2_SCORE_KEY, RETRIEVAL_SCORE_KEY, AT2_RANK_KEY, AT2_SENTENCES_KEY)

TITLE_KEYS = ("title", "file_name", "filename", "source")

def default_attributor() -> Any:
    """The embedded SmolLM2-135M-Instruct: the core's shared Attributor (one per process, whoever asks)."""
    from at2_rag import get_attributor

    return get_attributor()


def node_text(nws: NodeWithScore) -> str:
    """The text of a node without metadata: char offsets reported by this package are relative to it
    (for a `TextNode` this is exactly `node.text`)."""
    return nws.node.get_content(metadata_mode=MetadataMode.NONE)


def node_title(nws: NodeWithScore) -> Optional[str]:
    meta = nws.node.metadata or {}
    for key in TITLE_KEYS:
        value = meta.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def unique_nodes(nodes: Sequence[NodeWithScore]) -> List[NodeWithScore]:
    """Drop repeated node ids (a fusion retriever can return a node twice), keeping the first occurrence."""
    seen = set()
    out = []
    for nws in nodes:
        if nws.node.node_id in seen:
            continue
        seen.add(nws.node.node_id)
        out.append(nws)
    return out


def nodes_to_documents(nodes: Sequence[NodeWithScore], include_titles: bool = True) -> List[Any]:
    """at2-rag Documents for the nodes, in order; the document id is the node's `id_` (stable across runs
    when the node ids are)."""
    from at2_rag import Document

    return [
        Document(text=node_text(nws), id=nws.node.node_id, title=node_title(nws) if include_titles else None)
        for nws in nodes
    ]


def _sentence_dicts(sentences: Iterable[Any], k: int) -> List[Dict[str, Any]]:
    ranked = sorted(sentences, key=lambda s: s.score, reverse=True)[:k]
    return [{"text": s.text, "start": s.start, "end": s.end, "score": float(s.score)} for s in ranked]


def annotate_nodes(
    nodes: Sequence[NodeWithScore], attribution: Any, top_sentences: int = 3
) -> List[NodeWithScore]:
    """New `NodeWithScore`s (same order as `nodes`) whose `score` is the AT2 score and whose node is a shallow
    copy carrying `retrieval_score`, `at2_score`, `at2_rank` (1 = most used) and `at2_sentences` (the best
    supporting sentences, char offsets inside the node's text) in its metadata. The input nodes are not
    modified (retrievers often hand out the objects stored in the docstore)."""
    by_id = {d.id: d for d in attribution.documents}
    ranking = [d.id for d in sorted(attribution.documents, key=lambda d: d.score, reverse=True)]
    rank_of = {node_id: i + 1 for i, node_id in enumerate(ranking)}
    out = []
    for nws in nodes:
        doc = by_id[nws.node.node_id]
        node = nws.node.model_copy()
        node.metadata = {
            **(nws.node.metadata or {}),
            RETRIEVAL_SCORE_KEY: nws.score,
            AT2_SCORE_KEY: float(doc.score),
            AT2_RANK_KEY: rank_of[doc.id],
            AT2_SENTENCES_KEY: _sentence_dicts(doc.sentences, top_sentences),
        }
        for attr in ("excluded_llm_metadata_keys", "excluded_embed_metadata_keys"):
            if hasattr(node, attr):
                keys = list(getattr(node, attr) or [])
                setattr(node, attr, keys + [k for k in AT2_METADATA_KEYS if k not in keys])
        out.append(NodeWithScore(node=node, score=float(doc.score)))
    return out


def rank_nodes(nodes: Sequence[NodeWithScore]) -> List[NodeWithScore]:
    """Highest AT2 score first (stable: ties keep the retriever's order)."""
    return sorted(nodes, key=lambda n: n.score if n.score is not None else float("-inf"), reverse=True)


def citations_to_dicts(attribution: Any, top_sentences: int = 3) -> List[Dict[str, Any]]:
    """One dict per answer sentence:

    - `text`, `start`, `end`: the sentence and its char span in the answer;
    - `node_ids`: ids of the nodes cited for it, best first (may be empty: then `supported` is False);
    - `scores`: every node's AT2 score for this sentence;
    - `sources`: for each cited node, its score and best supporting sentences with `start`/`end` char offsets
      inside the node's text;
    - `grounded`: the estimated drop, in nats, of the sentence's log-odds if every node were removed
      (`supported` is `grounded` reaching the estimator's calibrated threshold);
    - `context`: the earlier turns / system prompt the sentence draws on, best first, as `key` and `score`.
    """
    out = []
    for c in attribution.citations:
        docs = {d.id: d for d in c.documents}
        out.append(
            {
                "text": c.text,
                "start": c.start,
                "end": c.end,
                "node_ids": list(c.cited),
                "supported": bool(c.supported),
                "scores": {d.id: float(d.score) for d in c.documents},
                "sources": [
                    {
                        "node_id": node_id,
                        "score": float(docs[node_id].score),
                        "sentences": _sentence_dicts(docs[node_id].sentences, top_sentences),
                    }
                    for node_id in c.cited
                ],
                "grounded": float(c.grounded),
                "context": [{"key": src.key, "score": float(src.score)} for src in c.context],
            }
        )
    return out


def context_sources(attribution: Any) -> List[Dict[str, Any]]:
    """The context sources (system prompt, earlier turns, the question) as `Attribution.to_dict()` writes
    them, each with its `key` (`"system"`, `"history:0"`, `"query"`)."""
    return [{"key": c.key, **c.model_dump(mode="json")} for c in attribution.context_sources]


def at2_summary(attribution: Any, nodes: Sequence[NodeWithScore]) -> Dict[str, Any]:
    """The `Response.metadata["at2"]` dict. Besides the node scores: `context_scores` (`{"system": s,
    "query": s, ...}`: the prompt's other parts, scored like the nodes, on the same scale) and `context_sources`
    (key, kind, index, role, text, score of each)."""
    ranked = sorted(attribution.documents, key=lambda d: d.score, reverse=True)
    return {
        "scores": {d.id: float(d.score) for d in attribution.documents},
        "retrieval_scores": {n.node.node_id: n.score for n in nodes},
        "ranking": [d.id for d in ranked],
        "prompt_order": [d.id for d in attribution.documents],
        "supported": bool(attribution.supported),
        "support_threshold": float(attribution.support_threshold),
        "estimator": attribution.estimator,
        "estimator_trained": bool(attribution.estimator_trained),
        "finish_reason": attribution.finish_reason,
        "num_prompt_tokens": attribution.num_prompt_tokens,
        "num_answer_tokens": attribution.num_answer_tokens,
        "extra_forward_passes": attribution.extra_forward_passes,
        "context_scores": {k: float(v) for k, v in attribution.context_scores().items()},
        "context_sources": context_sources(attribution),
    }
