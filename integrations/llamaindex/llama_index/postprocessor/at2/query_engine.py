"""AT2CitationQueryEngine: retrieve, answer with the local model, and cite what the answer actually used."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Iterator, Sequence
from typing import Any, Literal, cast

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.llms.types import CompletionResponse
from llama_index.core.base.response.schema import (
    RESPONSE_TYPE,
    AsyncStreamingResponse,
    Response,
    StreamingResponse,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.callbacks.schema import CBEventType, EventPayload
from llama_index.core.instrumentation.events.llm import LLMCompletionEndEvent, LLMCompletionStartEvent
from llama_index.core.instrumentation.events.query import QueryEndEvent, QueryStartEvent
from llama_index.core.instrumentation.events.synthesis import SynthesizeEndEvent, SynthesizeStartEvent
from llama_index.core.instrumentation.span import active_span_id
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.schema import NodeWithScore, QueryBundle, QueryType

from ._common import (
    MappedNodes,
    annotate_nodes,
    default_attributor,
    empty_metadata,
    generate_shared,
    map_nodes,
    prepare_request,
    rank_nodes,
    response_metadata,
)
from .events import AT2AttributionEndEvent, AT2AttributionStartEvent, dispatcher

logger = logging.getLogger(__name__)

EMPTY_RESPONSE = "Empty Response"
_DONE = object()


class AT2CitationQueryEngine(CustomQueryEngine):
    """Retrieve nodes, generate the answer with an `at2_rag.Attributor`'s own model while capturing attention,
    and attribute the answer to the nodes - one generation, plus one extra pass for measured groundedness (and
    `ablations=k`: k ablation passes refine the node scores, AT2 being the prior; k is capped at 2^number of
    nodes).

    `groundedness="measured"` (the default) measures how much each answer sentence depends on the nodes (the drop
    of its log-odds when every node is removed from attention; dependence, not truth) with one extra
    teacher-forced pass over the non-document part of the prompt and the answer; "estimated" predicts it at zero
    cost (less reliable on documents unlike the estimator's training data); "off" skips it (`grounded` None).

    The returned `Response`:

    - `response`: the answer text.
    - `source_nodes`: the retrieved nodes **ranked by AT2 score** (most used first). `NodeWithScore.score` is
      the AT2 attribution score; the retriever's score is kept in `node.metadata["retrieval_score"]`, the AT2
      score also in `node.metadata["at2_score"]`, the rank in `node.metadata["at2_rank"]`.
    - `metadata["at2"]`: `Attribution.to_dict()`, the core's versioned JSON (`schema` "at2-rag/attribution"):
      `documents` (score, sentences with char offsets inside each node's text), `citations` (per answer sentence:
      span in the answer, `cited` ids best first, `supported`, `grounded`, `context_grounded`, `context`, every
      node's score), `context_sources` (the system prompt and the question, scored like the nodes), estimator
      info, `groundedness` (the mode) and `extra_forward_passes`. Ids are the nodes' `id_` (`id#2` for a second
      node sharing an id with other text; `node.metadata["at2_document_id"]` says which).
    - `metadata["citations"]`: `metadata["at2"]["citations"]`; `metadata["attribution"]`: the `at2_rag.Attribution`
      (notebook / rich / plot views); `metadata["cited_answer"]`: the answer with `[n]` marks, n = the node's
      1-based position in `metadata["at2"]["documents"]` (the retriever's order).

    Nodes are mapped by the core (`at2_rag.map_documents`): a node returned twice with the same id and text is
    one document (and one source node). `query` / `aquery` emit LlamaIndex's standard events (query, synthesize,
    LLM completion with the exact prompt the model reads, and `AT2AttributionStartEvent` / `EndEvent`) and
    report to the engine's `callback_manager` (QUERY, SYNTHESIZE, LLM).

    With `streaming=True`, `query` returns a `StreamingResponse` (`aquery`: an `AsyncStreamingResponse`) whose
    `response_gen` yields the answer text. Its `source_nodes` and `metadata` are filled in place once the stream
    has been consumed to the end: until then `source_nodes` are the retrieved nodes with retriever scores and
    `metadata["at2_complete"]` is False. `get_response()` / `print_response_stream()` consume the stream for you.
    """

    retriever: BaseRetriever = Field(description="Where the nodes come from.")
    node_postprocessors: list[BaseNodePostprocessor] = Field(
        default_factory=list, description="Applied to the retrieved nodes before generation."
    )
    max_new_tokens: int = Field(default=128, ge=1)
    streaming: bool = Field(default=False)
    system_prompt: str | None = Field(default=None, description="None = at2-rag's default system prompt.")
    generate_kwargs: dict[str, Any] = Field(default_factory=dict)
    top_sentences: int = Field(default=3, ge=0, description="Supporting sentences reported per cited node.")
    ablations: int = Field(
        default=0, ge=0, strict=True, description="Ablation passes that refine the AT2 scores (0 = plain AT2)."
    )
    groundedness: Literal["measured", "estimated", "off"] = Field(
        default="measured",
        description="How each answer sentence's `grounded` is obtained: 'measured' (one extra pass without the "
        "nodes), 'estimated' (zero cost) or 'off'.",
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
        node_postprocessors: Sequence[BaseNodePostprocessor] | None = None,
        streaming: bool = False,
        max_new_tokens: int = 128,
        system_prompt: str | None = None,
        callback_manager: CallbackManager | None = None,
        generate_kwargs: dict[str, Any] | None = None,
        ablations: int = 0,
        groundedness: str = "measured",
        **retriever_kwargs: Any,
    ) -> AT2CitationQueryEngine:
        """`index_or_retriever`: an index (its `as_retriever(similarity_top_k=..., **retriever_kwargs)` is used)
        or a ready `BaseRetriever` (used as is: `similarity_top_k` and `retriever_kwargs` are then ignored, set
        them on the retriever). `attributor`: an `at2_rag.Attributor`; default the embedded SmolLM2.
        `ablations`: ablation passes that refine the scores of every answer (0 = plain AT2). `groundedness`:
        "measured" (default), "estimated" or "off"."""
        if isinstance(index_or_retriever, BaseRetriever):
            retriever = index_or_retriever
        elif hasattr(index_or_retriever, "as_retriever"):
            retriever = index_or_retriever.as_retriever(similarity_top_k=similarity_top_k, **retriever_kwargs)
        else:
            raise TypeError(f"expected a LlamaIndex index or BaseRetriever, got {type(index_or_retriever).__name__}")
        kwargs: dict[str, Any] = {}
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
            groundedness=groundedness,
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

    # ---- the standard query entry points (spans, QueryStart/End events, the callback manager) --------------
    @dispatcher.span
    def query(self, str_or_query_bundle: QueryType) -> RESPONSE_TYPE:
        dispatcher.event(QueryStartEvent(query=str_or_query_bundle))
        query_str = _query_str(str_or_query_bundle)
        with self.callback_manager.as_trace("query"):
            with self.callback_manager.event(CBEventType.QUERY, payload={EventPayload.QUERY_STR: query_str}) as ev:
                response = self.custom_query(query_str)
                ev.on_end(payload={EventPayload.RESPONSE: response})
        dispatcher.event(QueryEndEvent(query=str_or_query_bundle, response=response))
        return response

    @dispatcher.span
    async def aquery(self, str_or_query_bundle: QueryType) -> RESPONSE_TYPE:
        dispatcher.event(QueryStartEvent(query=str_or_query_bundle))
        query_str = _query_str(str_or_query_bundle)
        with self.callback_manager.as_trace("query"):
            with self.callback_manager.event(CBEventType.QUERY, payload={EventPayload.QUERY_STR: query_str}) as ev:
                response = await self.acustom_query(query_str)
                ev.on_end(payload={EventPayload.RESPONSE: response})
        dispatcher.event(QueryEndEvent(query=str_or_query_bundle, response=response))
        return response

    # ---- retrieval ----------------------------------------------------------------------------------------
    def retrieve(self, query_bundle: QueryType) -> list[NodeWithScore]:
        """Retrieved (and post-processed) nodes, one per at2 document (the core's duplicate-id policy)."""
        bundle = query_bundle if isinstance(query_bundle, QueryBundle) else QueryBundle(query_bundle)
        nodes = self.retriever.retrieve(bundle)
        for p in self.node_postprocessors:
            nodes = p.postprocess_nodes(nodes, query_bundle=bundle)
        return map_nodes(nodes).nodes if nodes else []

    async def aretrieve(self, query_bundle: QueryType) -> list[NodeWithScore]:
        bundle = query_bundle if isinstance(query_bundle, QueryBundle) else QueryBundle(query_bundle)
        nodes = await self.retriever.aretrieve(bundle)
        for p in self.node_postprocessors:
            nodes = await p.apostprocess_nodes(nodes, query_bundle=bundle)
        return map_nodes(nodes).nodes if nodes else []

    # ---- answering ----------------------------------------------------------------------------------------
    def _system_kwargs(self) -> dict[str, Any]:
        return {} if self.system_prompt is None else {"system_prompt": self.system_prompt}

    def _evidence_kwargs(self) -> dict[str, Any]:
        """What the attribution pays for after the answer (checked by the core when it attributes)."""
        return {"ablations": self.ablations, "groundedness": self.groundedness}

    def _empty(self) -> Response:
        metadata = empty_metadata()
        metadata["cited_answer"] = EMPTY_RESPONSE
        return Response(EMPTY_RESPONSE, [], metadata)

    def _fill(self, metadata: dict[str, Any], attribution: Any, nodes: list[NodeWithScore]) -> list[NodeWithScore]:
        data = attribution.to_dict()
        metadata.update(response_metadata(attribution, data))
        return rank_nodes(annotate_nodes(nodes, attribution, self.top_sentences, data=data))

    # the standard synthesize / LLM events around the one generation that answers and is attributed
    def _start(self, query_str: str, mapped: MappedNodes) -> _Run:
        span_id = active_span_id.get()
        dispatcher.event(SynthesizeStartEvent(query=query_str, span_id=span_id))
        prepared = prepare_request(
            self.attributor,
            query_str,
            mapped.documents,
            max_new_tokens=self.max_new_tokens,
            **self._system_kwargs(),
            **self.generate_kwargs,
        )
        prompt = prepared.prompt.text
        additional = {"max_new_tokens": self.max_new_tokens, **self.generate_kwargs}
        model = {"class_name": self.class_name(), "model": self.attributor.model_id}
        dispatcher.event(
            LLMCompletionStartEvent(prompt=prompt, additional_kwargs=additional, model_dict=model, span_id=span_id)
        )
        llm_event = self.callback_manager.on_event_start(
            CBEventType.LLM, payload={EventPayload.PROMPT: prompt, EventPayload.ADDITIONAL_KWARGS: additional}
        )
        ids = [d.id for d in mapped.documents]
        dispatcher.event(
            AT2AttributionStartEvent(source="query_engine", query=query_str, document_ids=ids, span_id=span_id)
        )
        return _Run(query_str=query_str, span_id=span_id, prompt=prompt, llm_event=llm_event, prepared=prepared)

    def _end(self, run: _Run, attribution: Any = None, error: BaseException | None = None) -> None:
        answer = "" if attribution is None else attribution.answer
        completion = CompletionResponse(text=answer)
        self.callback_manager.on_event_end(
            CBEventType.LLM,
            payload={EventPayload.PROMPT: run.prompt, EventPayload.COMPLETION: completion},
            event_id=run.llm_event,
        )
        dispatcher.event(LLMCompletionEndEvent(prompt=run.prompt, response=completion, span_id=run.span_id))
        dispatcher.event(
            AT2AttributionEndEvent(
                source="query_engine",
                query=run.query_str,
                scores={} if attribution is None else attribution.document_scores(),
                attribution=None if attribution is None else attribution.to_dict(),
                error=None if error is None else repr(error),
                span_id=run.span_id,
            )
        )

    def _answer(self, query_str: str, nodes: list[NodeWithScore]) -> Response:
        mapped = map_nodes(nodes)
        with self.callback_manager.event(CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: query_str}) as ev:
            run = self._start(query_str, mapped)
            try:
                attribution = generate_shared(self.attributor, run.prepared, **self._evidence_kwargs())
            except Exception as exc:
                self._end(run, error=exc)
                raise
            self._end(run, attribution)
            metadata: dict[str, Any] = {}
            ranked = self._fill(metadata, attribution, mapped.nodes)
            response = Response(attribution.answer, ranked, metadata)
            ev.on_end(payload={EventPayload.RESPONSE: response})
        dispatcher.event(SynthesizeEndEvent(query=query_str, response=response, span_id=run.span_id))
        return response

    def _token_gen(
        self, run: _Run, mapped: MappedNodes, source_nodes: list[NodeWithScore], metadata: dict[str, Any]
    ) -> Iterator[str]:
        from at2_rag import Attribution

        try:
            for item in self.attributor.stream(run.prepared, **self._evidence_kwargs()):
                if isinstance(item, Attribution):
                    self._end(run, item)
                    source_nodes[:] = self._fill(metadata, item, mapped.nodes)
                else:
                    yield item
        except Exception as exc:
            self._end(run, error=exc)
            raise

    def _streaming(self, query_str: str, nodes: list[NodeWithScore]) -> tuple:
        mapped = map_nodes(nodes)
        with self.callback_manager.event(CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: query_str}):
            run = self._start(query_str, mapped)
        source_nodes: list[NodeWithScore] = list(mapped.nodes)
        metadata = empty_metadata(complete=False)
        return self._token_gen(run, mapped, source_nodes, metadata), source_nodes, metadata, run

    def custom_query(self, query_str: str) -> Response | StreamingResponse:
        nodes = self.retrieve(query_str)
        if not nodes:
            return self._empty()
        if not self.streaming:
            return self._answer(query_str, nodes)
        gen, source_nodes, metadata, run = self._streaming(query_str, nodes)
        response = StreamingResponse(response_gen=gen, source_nodes=source_nodes, metadata=metadata)
        dispatcher.event(SynthesizeEndEvent(query=query_str, response=response, span_id=run.span_id))
        return response

    async def acustom_query(self, query_str: str) -> RESPONSE_TYPE:
        """Retrieval uses the retriever's `aretrieve`; generation runs in a worker thread (the event loop stays
        free, token by token when streaming)."""
        nodes = await self.aretrieve(query_str)
        if not nodes:
            return self._empty()
        if not self.streaming:
            return await asyncio.to_thread(self._answer, query_str, nodes)
        sync_gen, source_nodes, metadata, run = self._streaming(query_str, nodes)

        async def agen() -> AsyncGenerator[str, None]:
            while True:
                item = await asyncio.to_thread(next, sync_gen, _DONE)
                if item is _DONE:
                    return
                yield cast(str, item)

        response = AsyncStreamingResponse(response_gen=agen(), source_nodes=source_nodes, metadata=metadata)
        dispatcher.event(SynthesizeEndEvent(query=query_str, response=response, span_id=run.span_id))
        return response


class _Run:
    """One attributed generation in flight: what its end events need."""

    __slots__ = ("query_str", "span_id", "prompt", "llm_event", "prepared")

    def __init__(self, query_str: str, span_id: str | None, prompt: str, llm_event: str, prepared: Any) -> None:
        self.query_str, self.span_id, self.prompt, self.llm_event = query_str, span_id, prompt, llm_event
        self.prepared = prepared  # the request as `Attributor.prepare` checked it: what the generation runs


def _query_str(str_or_query_bundle: QueryType) -> str:
    if isinstance(str_or_query_bundle, QueryBundle):
        return str_or_query_bundle.query_str
    if not isinstance(str_or_query_bundle, str):
        raise TypeError(f"query must be a string or a QueryBundle, got {type(str_or_query_bundle).__name__}")
    return str_or_query_bundle
