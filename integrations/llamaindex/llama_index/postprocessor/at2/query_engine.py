"""AT2CitationQueryEngine: retrieve, answer with the local model, and cite what the answer actually used."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Dict, Iterator, List, Optional, Sequence, Union

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.response.schema import (
    RESPONSE_TYPE,
    AsyncStreamingResponse,
    Response,
    StreamingResponse,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.schema import NodeWithScore, QueryBundle, QueryType

from ._common import (
    annotate_nodes,
    at2_summary,
    citations_to_dicts,
    default_attributor,
    nodes_to_documents,
    rank_nodes,
    unique_nodes,
)

EMPTY_RESPONSE = "Empty Response"
_DONE = object()


class AT2CitationQueryEngine(CustomQueryEngine):
    """Retrieve nodes, generate the answer with an `at2_rag.Attributor`'s own model while capturing attention,
    and attribute the answer to the nodes - one generation, no extra forward passes (unless `ablations=k`:
    then k ablation passes refine the node scores, AT2 being the prior; k is capped at 2^number of nodes).

    The returned `Response`:

    - `response`: the answer text.
    - `source_nodes`: the retrieved nodes **ranked by AT2 score** (most used first). `NodeWithScore.score` is
      the AT2 attribution score; the retriever's score is kept in `node.metadata["retrieval_score"]`, the AT2
      score also in `node.metadata["at2_score"]`, the rank in `node.metadata["at2_rank"]`.
    - `metadata["citations"]`: one dict per answer sentence - `text`, `start`/`end` (char span in the answer),
      `node_ids` (cited nodes, best first), `supported`, `scores` (every node's score for that sentence) and
      `sources` (for each cited node, its best supporting sentences with `start`/`end` char offsets inside the
      node's text, i.e. `node.get_content(metadata_mode=MetadataMode.NONE)`), `grounded` (nats: how much the
      sentence depends on the nodes at all) and `context` (system prompt / earlier turns it draws on).
    - `metadata["at2"]`: `scores` (node id -> AT2 score for the whole answer), `retrieval_scores`, `ranking`,
      `prompt_order`, `supported`, estimator info, `extra_forward_passes` (ablation passes paid: 0 or k),
      `context_scores` / `context_sources` (the system prompt and the question, scored like the nodes).
    - `metadata["attribution"]`: the full `at2_rag.Attribution` (notebook / rich / plot views);
      `metadata["cited_answer"]`: the answer with `[n]` marks, n = the node's 1-based position in
      `metadata["at2"]["prompt_order"]` (the retriever's order).

    With `streaming=True`, `query` returns a `StreamingResponse` (`aquery`: an `AsyncStreamingResponse`) whose
    `response_gen` yields the answer text. Its `source_nodes` and `metadata` are filled in place once the stream
    has been consumed to the end: until then `source_nodes` are the retrieved nodes with retriever scores and
    `metadata["at2_complete"]` is False. `get_response()` / `print_response_stream()` consume the stream for you.
    """

    retriever: BaseRetriever = Field(description="Where the nodes come from.")
    node_postprocessors: List[BaseNodePostprocessor] = Field(
        default_factory=list, description="Applied to the retrieved nodes before generation."
    )
    max_new_tokens: int = Field(default=128, ge=1)
    streaming: bool = Field(default=False)
    system_prompt: Optional[str] = Field(default=None, description="None = at2-rag's default system prompt.")
    generate_kwargs: Dict[str, Any] = Field(default_factory=dict)
    top_sentences: int = Field(default=3, ge=0, description="Supporting sentences reported per cited node.")
    ablations: int = Field(
        default=0, ge=0, strict=True, description="Ablation passes that refine the AT2 scores (0 = plain AT2)."
    )

    _attributor: Any = PrivateAttr(default=None)

    def __init__(self, retriever: BaseRetriever, attributor: Any = None, **kwargs: Any) -> None:
        super().__init__(retriever=retriever, **kwargs)
        self._attributor = attributor

    @classmethod
    def from_args(
        cls,
        index_or_retriever: Any,
        attributor: Any = None,
        similarity_top_k: int = 4,
        node_postprocessors: Optional[Sequence[BaseNodePostprocessor]] = None,
        streaming: bool = False,
        max_new_tokens: int = 128,
        system_prompt: Optional[str] = None,
        callback_manager: Optional[CallbackManager] = None,
        generate_kwargs: Optional[Dict[str, Any]] = None,
        ablations: int = 0,
        **retriever_kwargs: Any,
    ) -> "AT2CitationQueryEngine":
        """`index_or_retriever`: an index (its `as_retriever(similarity_top_k=..., **retriever_kwargs)` is used)
        or a ready `BaseRetriever` (used as is: `similarity_top_k` and `retriever_kwargs` are then ignored, set
        them on the retriever). `attributor`: an `at2_rag.Attributor`; default the embedded SmolLM2.
        `ablations`: ablation passes that refine the scores of every answer (0 = plain AT2)."""
        if isinstance(index_or_retriever, BaseRetriever):
            retriever = index_or_retriever
        elif hasattr(index_or_retriever, "as_retriever"):
            retriever = index_or_retriever.as_retriever(similarity_top_k=similarity_top_k, **retriever_kwargs)
        else:
            raise TypeError(
                f"expected a LlamaIndex index or BaseRetriever, got {type(index_or_retriever).__name__}"
            )
        kwargs: Dict[str, Any] = {}
        if callback_manager is not None:
            kwargs["callback_manager"] = callback_manager
        return cls(
            retriever=retriever,
            attributor=attributor,
            node_postprocessors=list(node_postprocessors or []),
            streaming=streaming,
            max_new_tokens=max_new_tokens,
            system_prompt=system_prompt,
            generate_kwargs=dict(generate_kwargs or {}),
            ablations=ablations,
            **kwargs,
        )

    @classmethod
    def class_name(cls) -> str:
        return "AT2CitationQueryEngine"

    @property
    def attributor(self) -> Any:
        if self._attributor is None:
            self._attributor = default_attributor()
        return self._attributor

    # ---- retrieval ----------------------------------------------------------------------------------------
    def retrieve(self, query_bundle: QueryType) -> List[NodeWithScore]:
        bundle = query_bundle if isinstance(query_bundle, QueryBundle) else QueryBundle(query_bundle)
        nodes = self.retriever.retrieve(bundle)
        for p in self.node_postprocessors:
            nodes = p.postprocess_nodes(nodes, query_bundle=bundle)
        return unique_nodes(nodes)

    async def aretrieve(self, query_bundle: QueryType) -> List[NodeWithScore]:
        bundle = query_bundle if isinstance(query_bundle, QueryBundle) else QueryBundle(query_bundle)
        nodes = await self.retriever.aretrieve(bundle)
        for p in self.node_postprocessors:
            nodes = await p.apostprocess_nodes(nodes, query_bundle=bundle)
        return unique_nodes(nodes)

    # ---- answering ----------------------------------------------------------------------------------------
    def _generate_kwargs(self) -> Dict[str, Any]:
        kwargs = dict(self.generate_kwargs)
        if self.system_prompt is not None:
            kwargs["system_prompt"] = self.system_prompt
        kwargs["max_new_tokens"] = self.max_new_tokens
        kwargs["ablations"] = self.ablations
        return kwargs

    def _empty(self) -> Response:
        return Response(
            EMPTY_RESPONSE,
            [],
            {"citations": [], "at2": None, "attribution": None, "cited_answer": EMPTY_RESPONSE, "at2_complete": True},
        )

    def _fill(self, metadata: Dict[str, Any], attribution: Any, nodes: List[NodeWithScore]) -> List[NodeWithScore]:
        ranked = rank_nodes(annotate_nodes(nodes, attribution, self.top_sentences))
        metadata.update(
            citations=citations_to_dicts(attribution, self.top_sentences),
            at2=at2_summary(attribution, nodes),
            attribution=attribution,
            cited_answer=attribution.cited_answer(),
            at2_complete=True,
        )
        return ranked

    def _answer(self, query_str: str, nodes: List[NodeWithScore]) -> Response:
        attribution = self.attributor.generate(query_str, nodes_to_documents(nodes), **self._generate_kwargs())
        metadata: Dict[str, Any] = {}
        ranked = self._fill(metadata, attribution, nodes)
        return Response(attribution.answer, ranked, metadata)

    def _pending(self, nodes: List[NodeWithScore]) -> tuple:
        metadata: Dict[str, Any] = {
            "citations": None,
            "at2": None,
            "attribution": None,
            "cited_answer": None,
            "at2_complete": False,
        }
        return list(nodes), metadata

    def _token_gen(
        self, query_str: str, nodes: List[NodeWithScore], source_nodes: List[NodeWithScore], metadata: Dict[str, Any]
    ) -> Iterator[str]:
        from at2_rag import Attribution

        for item in self.attributor.stream(query_str, nodes_to_documents(nodes), **self._generate_kwargs()):
            if isinstance(item, Attribution):
                source_nodes[:] = self._fill(metadata, item, nodes)
            else:
                yield item

    def custom_query(self, query_str: str) -> Union[Response, StreamingResponse]:
        nodes = self.retrieve(query_str)
        if not nodes:
            return self._empty()
        if not self.streaming:
            return self._answer(query_str, nodes)
        source_nodes, metadata = self._pending(nodes)
        return StreamingResponse(
            response_gen=self._token_gen(query_str, nodes, source_nodes, metadata),
            source_nodes=source_nodes,
            metadata=metadata,
        )

    async def acustom_query(self, query_str: str) -> RESPONSE_TYPE:
        """Retrieval uses the retriever's `aretrieve`; generation runs in a worker thread."""
        nodes = await self.aretrieve(query_str)
        if not nodes:
            return self._empty()
        if not self.streaming:
            return await asyncio.to_thread(self._answer, query_str, nodes)
        source_nodes, metadata = self._pending(nodes)
        sync_gen = self._token_gen(query_str, nodes, source_nodes, metadata)

        async def agen() -> AsyncIterator[str]:
            while True:
                item = await asyncio.to_thread(next, sync_gen, _DONE)
                if item is _DONE:
                    return
                yield item

        return AsyncStreamingResponse(response_gen=agen(), source_nodes=source_nodes, metadata=metadata)
