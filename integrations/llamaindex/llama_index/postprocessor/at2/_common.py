"""Shared pieces: the default attributor, LlamaIndex nodes -> at2-rag documents (the core's mapping and duplicate-id
policy), nodes annotated from `Attribution.to_dict()`, and the `Response.metadata` an attribution becomes.

Nothing here decides a policy or serialises an attribution: `at2_rag.map_documents` maps the nodes (and merges or
renames repeated ids), `Attribution.to_dict()` is the one serialisation; this module only translates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llama_index.core.schema import MetadataMode, NodeWithScore

# Keys this package writes into a returned node's metadata. They are excluded from the text the LLM and the
# embedding model see, so a downstream synthesizer's context is unchanged.
AT2_SCORE_KEY = "at2_score"
RETRIEVAL_SCORE_KEY = "retrieval_score"
AT2_RANK_KEY = "at2_rank"
AT2_SENTENCES_KEY = "at2_sentences"
AT2_DOCUMENT_ID_KEY = "at2_document_id"
AT2_METADATA_KEYS = (AT2_SCORE_KEY, RETRIEVAL_SCORE_KEY, AT2_RANK_KEY, AT2_SENTENCES_KEY, AT2_DOCUMENT_ID_KEY)


def default_attributor() -> Any:
    """The embedded SmolLM2-135M-Instruct: the core's shared Attributor (one per process, whoever asks)."""
    from at2_rag import get_attributor

    return get_attributor()


def node_text(nws: NodeWithScore) -> str:
    """The text of a node without metadata: char offsets reported by this package are relative to it
    (for a `TextNode` this is exactly `node.text`)."""
    return nws.node.get_content(metadata_mode=MetadataMode.NONE)


@dataclass(frozen=True)
class MappedNodes:
    """Nodes as the core maps them (`at2_rag.map_documents`).

    `nodes`: one node per at2 document, in order (a node repeated with the same id and text is kept once);
    `documents`: the at2 `Document`s; `document_ids[i]`: the at2 id of input node i (`id`, or `id#2` for a second
    chunk sharing an id with other text)."""

    nodes: list[NodeWithScore]
    documents: list[Any]
    document_ids: list[str]


def map_nodes(nodes: Sequence[NodeWithScore], include_titles: bool = True) -> MappedNodes:
    """The core's one mapping and duplicate-id policy applied to LlamaIndex nodes (refuses an empty list)."""
    from at2_rag import map_documents

    mapped = map_documents(list(nodes))
    firsts: dict[str, NodeWithScore] = {}
    for nws, doc_id in zip(nodes, mapped.ids):
        firsts.setdefault(doc_id, nws)
    documents = mapped.documents
    if not include_titles:
        documents = [d.model_copy(update={"title": None}) for d in documents]
    # one node per document, in the documents' order (each document is where its id first occurs)
    return MappedNodes(nodes=list(firsts.values()), documents=documents, document_ids=mapped.ids)


def unique_nodes(nodes: Sequence[NodeWithScore]) -> list[NodeWithScore]:
    """One node per at2 document (the core's policy: a node returned twice with the same id and text, as a fusion
    retriever does, is kept once; nodes sharing an id with other text are all kept)."""
    return map_nodes(nodes).nodes if nodes else []


def nodes_to_documents(nodes: Sequence[NodeWithScore], include_titles: bool = True) -> list[Any]:
    """at2-rag Documents for the nodes, in order: `at2_rag.map_documents(nodes).documents` (id = the node's `id_`,
    text without metadata, title from the metadata's title / file_name / filename)."""
    return map_nodes(nodes, include_titles).documents


def _top_sentences(doc: dict[str, Any], k: int) -> list[dict[str, Any]]:
    return sorted(doc.get("sentences", []), key=lambda s: s["score"], reverse=True)[:k]


def _with_at2_metadata(nws: NodeWithScore, values: dict[str, Any]) -> NodeWithScore:
    node = nws.node.model_copy()
    node.metadata = {**(nws.node.metadata or {}), RETRIEVAL_SCORE_KEY: nws.score, **values}
    for attr in ("excluded_llm_metadata_keys", "excluded_embed_metadata_keys"):
        if hasattr(node, attr):
            keys = list(getattr(node, attr) or [])
            setattr(node, attr, keys + [k for k in AT2_METADATA_KEYS if k not in keys])
    return NodeWithScore(node=node, score=values.get(AT2_SCORE_KEY))


def annotate_nodes(
    nodes: Sequence[NodeWithScore],
    attribution: Any,
    top_sentences: int = 3,
    data: dict[str, Any] | None = None,
) -> list[NodeWithScore]:
    """New `NodeWithScore`s, one per at2 document (the first node of each, in input order), whose `score` is the
    AT2 score and whose node is a shallow copy carrying `retrieval_score`, `at2_score`, `at2_rank` (1 = most
    used), `at2_sentences` (the best supporting sentences, char offsets inside the node's text) and
    `at2_document_id` (the id the scores are keyed by) in its metadata, read from `attribution.to_dict()` (or
    `data`, that dict already made). A node that is not in the attribution (not found in a prompt rendered
    elsewhere) gets score None and `at2_score` None. The input nodes are not modified (retrievers often hand out
    the objects stored in the docstore)."""
    if not nodes:
        return []
    data = data if data is not None else attribution.to_dict()
    docs = {d["id"]: d for d in data["documents"]}
    ranking = [d["id"] for d in sorted(data["documents"], key=lambda d: d["score"], reverse=True)]
    rank_of = {doc_id: i + 1 for i, doc_id in enumerate(ranking)}
    mapped = map_nodes(nodes)
    out = []
    for nws, document in zip(mapped.nodes, mapped.documents):
        doc = docs.get(document.id)
        out.append(
            _with_at2_metadata(
                nws,
                {
                    AT2_SCORE_KEY: None if doc is None else float(doc["score"]),
                    AT2_RANK_KEY: rank_of.get(document.id),
                    AT2_SENTENCES_KEY: [] if doc is None else _top_sentences(doc, top_sentences),
                    AT2_DOCUMENT_ID_KEY: document.id,
                },
            )
        )
    return out


def rank_nodes(nodes: Sequence[NodeWithScore]) -> list[NodeWithScore]:
    """Highest AT2 score first (stable: ties keep the retriever's order; unscored nodes last)."""
    return sorted(nodes, key=lambda n: n.score if n.score is not None else float("-inf"), reverse=True)


def citations_to_dicts(attribution: Any, top_sentences: int = 3) -> list[dict[str, Any]]:
    """`attribution.to_dict()["citations"]`: per answer sentence `text`, `start`/`end` (span in the answer),
    `documents` (every node's score for it, best supporting sentences with char offsets inside the node's text),
    `cited` (at2 document ids, best first), `supported`, `grounded` (nats: how much the sentence depends on the
    documents; None with groundedness "off"), `context_grounded` (the same for the earlier turns, measured in a
    conversation), `context`. `top_sentences` is kept for
    compatibility and ignored: the core's schema carries every scored sentence."""
    return attribution.to_dict()["citations"]


def empty_metadata(complete: bool = True) -> dict[str, Any]:
    """`Response.metadata` before (or without) an attribution."""
    return {
        "at2": None,
        "citations": [] if complete else None,
        "attribution": None,
        "cited_answer": None,
        "at2_complete": complete,
    }


def response_metadata(attribution: Any, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keys this package adds to `Response.metadata`:

    - `at2`: `attribution.to_dict()`, the core's versioned JSON (`schema` "at2-rag/attribution");
    - `citations`: the same dict's `citations` (one per answer sentence);
    - `attribution`: the `at2_rag.Attribution` itself (`.plot()`, notebook / rich views);
    - `cited_answer`: the answer with `[n]` marks (n = 1-based position of the node in `at2["documents"]`);
    - `at2_complete`: True.
    """
    data = data if data is not None else attribution.to_dict()
    return {
        "at2": data,
        "citations": data["citations"],
        "attribution": attribution,
        "cited_answer": attribution.cited_answer(),
        "at2_complete": True,
    }


def chat_dicts(messages: Sequence[Any], system_prompt: str | None = None) -> list[dict[str, str]]:
    """LlamaIndex `ChatMessage`s as role/content dicts for the core (roles mapped to system/user/assistant)."""
    turns: list[dict[str, str]] = []
    for m in messages:
        role = m.role.value if hasattr(m.role, "value") else str(m.role)
        role = {"model": "assistant", "chatbot": "assistant", "developer": "system"}.get(role, role)
        if role not in ("system", "user", "assistant"):
            role = "user"
        turns.append({"role": role, "content": m.content or ""})
    if system_prompt and not any(t["role"] == "system" for t in turns):
        turns.insert(0, {"role": "system", "content": system_prompt})
    return turns


def prepare_request(
    attributor: Any,
    query: str,
    documents: Sequence[Any],
    *,
    max_new_tokens: int = 256,
    system_prompt: Any = None,
    **generate_kwargs: Any,
) -> Any:
    """`Attributor.prepare`: at2-rag's own prompt for the question and the nodes' documents (`system_prompt` None:
    the template's), checked once (`ContextTooLongError` when it and `max_new_tokens` exceed the context window)."""
    system = {} if system_prompt is None else {"system_prompt": system_prompt}
    return attributor.prepare(query, list(documents), max_new_tokens=max_new_tokens, **system, **generate_kwargs)


def generate_shared(attributor: Any, prepared: Any, *, ablations: int = 0, groundedness: str = "measured") -> Any:
    """A prepared request (`prepare_request`) generated and attributed through the model's shared micro-batcher
    (`at2_rag.get_micro_batcher`): concurrent queries (threads, `aquery` in worker threads) share one batched
    generation; a query alone runs exactly the single-request path. `groundedness`: "measured" (one extra pass
    without the documents), "estimated" or "off" (see `Attributor.generate`); a bad value (or `ablations`) raises
    `at2_rag.InvalidInputError` here."""
    from at2_rag import get_micro_batcher

    future = get_micro_batcher(attributor).submit(prepared, ablations=ablations, groundedness=groundedness)
    return future.result()
