"""AT2NodePostprocessor: re-score retrieved nodes by how much the local model's answer actually uses them."""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Literal

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle

from ._common import annotate_nodes, default_attributor, generate_shared, map_nodes, prepare_request, rank_nodes
from .events import AT2AttributionEndEvent, AT2AttributionStartEvent, dispatcher


class AT2NodePostprocessor(BaseNodePostprocessor):
    """Runs the local model once on the query and the retrieved nodes, with attention capture, and scores every
    node by how much the generated answer uses it (AT2).

    Returned nodes are copies: `NodeWithScore.score` is the AT2 score; the node's metadata gains
    `retrieval_score` (the score the node came in with), `at2_score`, `at2_rank` (1 = most used) and
    `at2_sentences` (best supporting sentences with char offsets inside the node's text). These keys are
    excluded from the LLM's and the embedder's view of the node.

    - `mode="rerank"`: nodes sorted by AT2 score, best first.
    - `mode="filter"`: the retriever's order is kept and only the nodes that matter survive (context pruning as
      in the AT2 paper, so a downstream synthesizer sees less text). With neither `top_k`, `threshold` nor
      `relative_threshold` set, filter keeps nodes scoring at least the estimator's support threshold.

    Selection (both modes): drop nodes below `threshold` (absolute AT2 score) or below
    `relative_threshold * best score`, then keep at most `top_k`; at least `min_keep` nodes are always kept.

    `ablations=k` pays k ablation passes after the answer to refine the node scores (AT2 is the prior; 0, the
    default, is plain AT2). `last_attribution.extra_forward_passes` says how many were paid (k is capped at
    2^number of nodes).

    `groundedness="measured"` (the default) measures how much each answer sentence depends on the nodes (the drop
    of its log-odds when every node is removed from attention; dependence, not truth) with one extra
    teacher-forced pass over the non-document part of the prompt and the answer; "estimated" predicts it at zero
    cost (less reliable on documents unlike the estimator's training data); "off" skips it. It is in
    `last_attribution.citations[i].grounded` / `.supported`, and counted in `extra_forward_passes`.
    """

    mode: Literal["rerank", "filter"] = Field(default="rerank", description="'rerank' or 'filter'.")
    top_k: int | None = Field(default=None, ge=1, description="Keep at most this many nodes.")
    threshold: float | None = Field(default=None, description="Drop nodes whose AT2 score is below this.")
    relative_threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Drop nodes scoring below this fraction of the best node."
    )
    min_keep: int = Field(default=1, ge=0, description="Never return fewer nodes than this (if there are any).")
    max_new_tokens: int = Field(default=64, ge=1, description="Length of the answer generated to attribute.")
    system_prompt: str | None = Field(default=None, description="System prompt; None = at2-rag's default.")
    generate_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra `generate` arguments.")
    ablations: int = Field(
        default=0, ge=0, strict=True, description="Ablation passes that refine the AT2 scores (0 = plain AT2)."
    )
    groundedness: Literal["measured", "estimated", "off"] = Field(
        default="measured",
        description="How each answer sentence's `grounded` is obtained: 'measured' (one extra pass without the "
        "nodes), 'estimated' (zero cost) or 'off'.",
    )

    _attributor: Any = PrivateAttr(default=None)
    _last_attribution: Any = PrivateAttr(default=None)

    def __init__(self, attributor: Any = None, **kwargs: Any) -> None:
        """`attributor`: an `at2_rag.Attributor` (default: the embedded SmolLM2, loaded on first use and
        shared with every other component of this package that uses the default)."""
        super().__init__(**kwargs)
        self._attributor = attributor

    @classmethod
    def class_name(cls) -> str:
        return "AT2NodePostprocessor"

    @property
    def attributor(self) -> Any:
        if self._attributor is None:
            self._attributor = default_attributor()
        return self._attributor

    @property
    def last_attribution(self) -> Any:
        """The `at2_rag.Attribution` of the most recent call (convenience for interactive use; with concurrent
        calls on one postprocessor it is whichever finished last)."""
        return self._last_attribution

    # ---- core ---------------------------------------------------------------------------------------------
    def attribute_nodes(self, nodes: list[NodeWithScore], query_str: str) -> tuple[list[NodeWithScore], Any]:
        """Generate with capture and attribute: `(annotated nodes in input order, Attribution)`. Nodes are mapped
        by the core (`at2_rag.map_documents`): a node repeated with the same id and text is scored (and returned)
        once; nodes sharing an id with other text are all kept, the later ones scored as `id#2`, ...
        Dispatches `AT2AttributionStartEvent` / `AT2AttributionEndEvent`."""
        mapped = map_nodes(nodes)
        kwargs = dict(self.generate_kwargs)
        if self.system_prompt is not None:
            kwargs["system_prompt"] = self.system_prompt
        ids = [d.id for d in mapped.documents]
        dispatcher.event(AT2AttributionStartEvent(source="postprocessor", query=query_str, document_ids=ids))
        try:
            prepared = prepare_request(
                self.attributor, query_str, mapped.documents, max_new_tokens=self.max_new_tokens, **kwargs
            )
            attribution = generate_shared(
                self.attributor, prepared, ablations=self.ablations, groundedness=self.groundedness
            )
        except Exception as exc:
            dispatcher.event(AT2AttributionEndEvent(source="postprocessor", query=query_str, error=repr(exc)))
            raise
        data = attribution.to_dict()
        dispatcher.event(
            AT2AttributionEndEvent(
                source="postprocessor", query=query_str, scores=attribution.document_scores(), attribution=data
            )
        )
        self._last_attribution = attribution
        return annotate_nodes(mapped.nodes, attribution, data=data), attribution

    def select(self, annotated: list[NodeWithScore]) -> list[NodeWithScore]:
        """Apply mode / top_k / thresholds to nodes already carrying AT2 scores."""
        ranked = rank_nodes(annotated)
        if not ranked:
            return []
        threshold = self.threshold
        if self.mode == "filter" and threshold is None and self.top_k is None and self.relative_threshold is None:
            threshold = float(self.attributor.support_threshold)
        best = ranked[0].score or 0.0
        keep = ranked
        if threshold is not None:
            keep = [n for n in keep if (n.score or 0.0) >= threshold]
        if self.relative_threshold is not None:
            keep = [n for n in keep if (n.score or 0.0) >= self.relative_threshold * best]
        if self.top_k is not None:
            keep = keep[: self.top_k]
        if len(keep) < self.min_keep:
            keep = ranked[: self.min_keep]
        if self.mode == "rerank":
            return keep
        kept = {id(n) for n in keep}
        return [n for n in annotated if id(n) in kept]

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        if query_bundle is None:
            raise ValueError("AT2NodePostprocessor needs the query: pass query_bundle or query_str")
        if not nodes:
            return []
        annotated, _ = self.attribute_nodes(nodes, query_bundle.query_str)
        return self.select(annotated)

    async def _apostprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        """Runs the (CPU/GPU-bound) model call in the default executor, so the event loop stays free."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(self._postprocess_nodes, nodes, query_bundle))
