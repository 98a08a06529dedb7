"""Callback handlers that attribute the answers of existing chains to the documents their retrievers returned.

Attach one to any chain or graph (`config={"callbacks": [handler]}`). The handler is a langchain-core tracer
(`BaseTracer` / `AsyncBaseTracer`): the tracer base keeps the run tree of every live run (`run_map`) and forgets a
run when it ends. When a model call ends, the handler takes the documents of every retriever run that ended under
the same root run (the outermost run the handler sees), the exact prompt of that call (`on_chat_model_start`
messages, or `on_llm_start` text) and its answer, locates the documents inside the prompt (however the chain
formatted them) and runs one forward pass of the AT2 model over prompt + answer.

The chain's own LLM can be any chat model or LLM: the AT2 model (the embedded SmolLM2 unless told otherwise)
reads the same prompt and answer and scores them. That is exact when the chain's LLM *is* the AT2 model, and a
proxy reading otherwise.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any
from uuid import UUID

from langchain_core.callbacks.manager import adispatch_custom_event, dispatch_custom_event
from langchain_core.documents import Document
from langchain_core.messages import BaseMessage
from langchain_core.outputs import LLMResult
from langchain_core.runnables.config import run_in_executor
from langchain_core.tracers.base import AsyncBaseTracer, BaseTracer
from langchain_core.tracers.schemas import Run
from pydantic import BaseModel, ConfigDict, Field

from at2_rag import AT2Error, Attribution, Attributor
from at2_rag.errors import DocumentsNotLocatedError
from at2_rag.evidence.ablations import check_ablations
from at2_rag.evidence.groundedness import GroundednessMode, check_groundedness

from .._loading import get_attributor
from .._messages import last_human_text, to_chat_dicts
from ..annotations import PROVIDER, attribution_metadata, trace_summary
from ..documents import to_at2_documents, to_langchain_document

logger = logging.getLogger(__name__)

EVENT_NAME = "at2_attribution"
_QUERY_KEYS = ("question", "query", "input", "q")
#: where the handler keeps a chat model run's messages on its own `Run` (the tracer base stores them serialised)
_MESSAGES_KEY = "at2_messages"


class ChainAttribution(BaseModel):
    """The attribution of one model call inside one root run."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    run_id: UUID = Field(description="the root run: the outermost run the handler saw (what `chain.invoke` created)")
    llm_run_id: UUID
    query: str
    answer: str
    attribution: Attribution | None = None
    documents: list[Document] = Field(
        default_factory=list,
        description="the retrieved documents, each with metadata['at2_score'] (None when not found in the prompt)",
    )
    unlocated: list[dict[str, Any]] = Field(
        default_factory=list, description="retrieved documents that do not occur in the prompt, with the reason"
    )
    error: str | None = None
    run_name: str | None = Field(default=None, description="the model run's name (e.g. 'ChatAT2')")
    run_tags: list[str] = Field(default_factory=list, description="the model run's tags")
    run_metadata: dict[str, Any] = Field(
        default_factory=dict, description="the model run's LangChain metadata (LangGraph adds `langgraph_node`)"
    )

    @property
    def scores(self) -> dict[str, float]:
        return self.attribution.document_scores() if self.attribution else {}

    @property
    def supported(self) -> bool:
        return bool(self.attribution and self.attribution.supported)

    @property
    def context_scores(self) -> dict[str, float]:
        """`{"history:0": s, ..., "system": s, "query": s}`: the earlier turns, system prompt and question found
        in the prompt, scored like the documents (see `Attribution.context_sources`)."""
        return self.attribution.context_scores() if self.attribution else {}

    @property
    def metadata(self) -> dict[str, Any]:
        """The attribution as `ChatAT2` writes it into `response_metadata["at2"]`: `Attribution.to_dict()` plus
        `mode`, `scores`, `context_scores` (see `langchain_at2.annotations.attribution_metadata`); {} when there
        is none."""
        return attribution_metadata(self.attribution, mode="prompt") if self.attribution is not None else {}

    def to_event(self) -> dict[str, Any]:
        """The JSON-friendly payload of the `at2_attribution` custom event: `metadata` plus the run ids, query,
        answer and error (with no attribution: empty scores and citations, `supported` False, `groundedness`
        None)."""
        data: dict[str, Any] = {
            "run_id": str(self.run_id),
            "llm_run_id": str(self.llm_run_id),
            "query": self.query,
            "answer": self.answer,
            "error": self.error,
        }
        if self.attribution is not None:
            data.update(self.metadata)
        else:
            data.update(
                scores={},
                citations=[],
                supported=False,
                groundedness=None,
                unlocated_documents=list(self.unlocated),
                extra_forward_passes=0,
                context_scores={},
                context_sources=[],
            )
        return data


def _query_from_inputs(inputs: Any) -> str | None:
    if isinstance(inputs, str):
        return inputs
    if isinstance(inputs, Mapping):
        for key in _QUERY_KEYS:
            if isinstance(inputs.get(key), str):
                return inputs[key]
    return None


def _retrieved_documents(root: Run) -> list[Document]:
    """The documents of every retriever run that ended under `root`, in the order the retrievers started."""
    documents: list[Document] = []
    stack: list[Run] = [root]
    while stack:
        run = stack.pop()
        if run.run_type == "retriever" and run.end_time is not None and run.error is None and run.outputs:
            documents.extend(d for d in run.outputs.get("documents") or [] if isinstance(d, Document))
        stack.extend(reversed(list(run.child_runs)))
    return documents


class _AT2Tracker:
    """The attribution of finished model runs and the results store, shared by the sync and async handlers.

    Run bookkeeping is the tracer base's (`run_map`: live runs only, each with its child runs); the handler adds
    nothing per run beyond the `Run` objects themselves, and when a root run ends (`_persist_run`, the tracer's
    extension point: the outermost run the handler sees) drops the base's `order_map` entries of its whole tree,
    so nothing is kept for a run after its root ends, wherever the handler is attached."""

    run_map: dict[str, Run]
    order_map: dict[UUID, tuple[UUID, str]]

    def _setup(
        self,
        attributor: Attributor | None,
        model_name: str | None,
        estimator: str | None,
        device: str | None,
        dispatch_events: bool,
        trace_metadata: bool,
        max_results: int,
        ablations: int,
        groundedness: GroundednessMode,
    ) -> None:
        self.ablations = check_ablations(ablations)
        """ablation passes that refine each attribution (0 = plain AT2: one forward pass per model call)"""
        self.groundedness: GroundednessMode = check_groundedness(groundedness)
        """how each citation's `grounded` is obtained: "measured" (one extra pass), "estimated" or "off\""""
        self._attributor = attributor
        self._model_args = {"estimator": estimator, "device": device}
        self._model_name = model_name
        self.dispatch_events = dispatch_events
        self.trace_metadata = trace_metadata
        self.max_results = max_results
        self.results: OrderedDict[UUID, ChainAttribution] = OrderedDict()
        """root run id -> the model call under it that answered from the retrieved documents (the latest one that
        did; a later call whose prompt does not hold them never replaces it)"""
        self.calls: OrderedDict[UUID, list[ChainAttribution]] = OrderedDict()
        """root run id -> every attributed model call under it, in the order they ended"""
        self.llm_results: OrderedDict[UUID, ChainAttribution] = OrderedDict()
        """model-call run id -> its attribution"""
        self._results_lock = threading.Lock()

    @property
    def attributor(self) -> Attributor:
        if self._attributor is None:
            self._attributor = get_attributor(self._model_name, **self._model_args)
        return self._attributor

    # ---- tracer hooks -----------------------------------------------------------------------------------------
    def _persist_run_sync(self, run: Run) -> None:
        """Nothing is persisted: a root run's tree is dropped when it ends (the base drops its `run_map` entries;
        here its `order_map` entries: every run of the trace)."""
        for run_id, (trace_id, _) in list(self.order_map.items()):
            if trace_id == run.trace_id:
                self.order_map.pop(run_id, None)

    def _keep_messages(self, run_id: UUID, messages: list[list[BaseMessage]]) -> None:
        run = self.run_map.get(str(run_id))
        if run is not None:
            run.extra[_MESSAGES_KEY] = [list(batch) for batch in messages]

    # ---- attribution ------------------------------------------------------------------------------------------
    def _jobs(self, run: Run) -> Iterator[dict[str, Any]]:
        """What each prompt of a finished model run needs for attribution; none without retrieved documents."""
        root = self.run_map.get(str(run.trace_id)) if run.trace_id != run.id else None
        if root is None or run.error is not None:
            return
        documents = _retrieved_documents(root)
        if not documents:
            return
        query = _query_from_inputs(root.inputs)
        messages = run.extra.get(_MESSAGES_KEY)
        prompts: list[Any] = messages if messages is not None else list(run.inputs.get("prompts") or [])
        generations = (run.outputs or {}).get("generations") or []
        metadata = {k: v for k, v in (run.extra.get("metadata") or {}).items() if k != PROVIDER}
        for i, payload in enumerate(prompts):
            if i >= len(generations) or not generations[i]:
                continue
            if messages is not None:
                rendered: Any = to_chat_dicts(payload)
                fallback = last_human_text(payload)
            else:
                rendered, fallback = str(payload), ""
            yield {
                "root": root.id,
                "run": run,
                "prompt": rendered,
                "answer": generations[i][0].get("text") or "",
                "documents": documents,
                "query": query or fallback,
                "run_metadata": metadata,
            }

    def _compute(self, job: dict[str, Any]) -> ChainAttribution:
        run: Run = job["run"]
        documents = to_at2_documents(job["documents"])
        attribution: Attribution | None = None
        unlocated: list[dict[str, Any]] = []
        error = None
        if not job["answer"].strip():
            error = "the model's answer is empty"
        else:
            try:
                attribution = self.attributor.attribute_rendered(
                    job["prompt"],
                    documents,
                    job["answer"],
                    job["query"],
                    ablations=self.ablations,
                    groundedness=self.groundedness,
                )
                unlocated = [u.to_dict() for u in attribution.unlocated_documents]
            except DocumentsNotLocatedError as exc:
                unlocated = [u.to_dict() for u in exc.unlocated]
                error = f"none of the {len(documents)} retrieved documents occurs in the prompt"
            except (AT2Error, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        if attribution is not None and unlocated:
            logger.warning(
                "AT2: %d of %d retrieved documents were not found in the prompt of run %s and get no score: %s",
                len(unlocated),
                len(documents),
                run.id,
                "; ".join(f"{u['id']}: {u['reason']}" for u in unlocated),
            )
        if error:  # a call whose prompt holds none of the documents (a grader, a router) is routine in a graph
            none_located = attribution is None and bool(unlocated) and len(unlocated) == len(documents)
            level = logging.INFO if none_located else logging.WARNING
            logger.log(level, "AT2: no attribution for run %s (%s): %s", run.id, run.name, error)
        scores = attribution.document_scores() if attribution else {}
        return ChainAttribution(
            run_id=job["root"],
            llm_run_id=run.id,
            query=job["query"],
            answer=job["answer"],
            attribution=attribution,
            documents=[to_langchain_document(d, at2_score=scores.get(d.id or "")) for d in documents],
            unlocated=unlocated,
            error=error,
            run_name=run.name,
            run_tags=list(run.tags or []),
            run_metadata=job["run_metadata"],
        )

    def _store(self, result: ChainAttribution, run: Run) -> dict[str, Any]:
        """Keep the result; put its summary into the model run's trace metadata; return the event payload."""
        event = result.to_event()
        if self.trace_metadata:
            # the metadata dict LangChain handed every handler of this model run: tracers that end the run after
            # this handler (LangSmith's is added after the config's callbacks) record the summary with it
            shared = run.extra.get("metadata")
            if isinstance(shared, dict):
                shared[PROVIDER] = {**trace_summary(event), "error": result.error}
        with self._results_lock:
            self.llm_results[result.llm_run_id] = result
            self.calls.setdefault(result.run_id, []).append(result)
            self.calls.move_to_end(result.run_id)
            current = self.results.get(result.run_id)
            if current is None or result.attribution is not None:
                self.results[result.run_id] = result
            self.results.move_to_end(result.run_id)
            for table in (self.results, self.calls, self.llm_results):
                while len(table) > self.max_results:
                    table.popitem(last=False)
        return event


_HANDLER_DOC = """

    ```python
    handler = AT2CallbackHandler()              # the embedded SmolLM2 scores (or pass attributor=...)
    answer = chain.invoke("question?", config={"callbacks": [handler], "run_id": run_id})
    result = handler.results[run_id]            # ChainAttribution: .scores, .attribution, .unlocated, .error
    handler.calls[run_id]                       # every attributed model call under that root, in order
    ```

    Root run ids come from `config={"run_id": ...}`, `collect_runs()`, or `handler.results` (insertion ordered);
    attached below the root (e.g. `inner.with_config(callbacks=[handler])`), the root is the outermost run the
    handler sees. `results[root]` is the model call that answered from the retrieved documents: a later call
    whose prompt does not hold them (a grader, a router) never replaces it; `llm_results[llm_run_id]` and
    `calls[root]` keep every call. The oldest are dropped after `max_results`.

    Each result also goes out as the custom event `"at2_attribution"` (see `astream_events`) when the model call
    runs inside a chain, and, with `trace_metadata=True` (default), its summary (`schema`, `scores`,
    `context_scores`, `supported`, `groundedness`, `extra_forward_passes`, `error`) lands in the model run's trace
    metadata under `"at2"` for tracers that end the run after this handler (LangSmith's tracer is added after the
    callbacks of the config). Thread safe: one handler can serve concurrent invocations.

    `ablations=k` pays k ablation passes per attributed model call to refine the scores (0, the default, is plain
    AT2); the event's `extra_forward_passes` says how many were paid.

    `groundedness="measured"` (the default) measures how much each answer sentence depends on the retrieved
    documents (the drop of its log-odds when every document is removed from attention; dependence, not truth)
    with one extra teacher-forced pass over the non-document part of the prompt and the answer (one more, removing
    the earlier turns, in a conversation); "estimated" predicts it at zero cost (less reliable on documents unlike
    the estimator's training data); "off" skips it. Each citation carries `grounded`, `supported` and
    `context_grounded`, the result `groundedness`.
    """


class AT2CallbackHandler(_AT2Tracker, BaseTracer):
    __doc__ = "Attribute the answers of any chain that retrieves documents and then calls a model." + _HANDLER_DOC

    name: str = "at2_callback_handler"

    def __init__(
        self,
        attributor: Attributor | None = None,
        *,
        model_name: str | None = None,
        estimator: str | None = None,
        device: str | None = None,
        dispatch_events: bool = True,
        trace_metadata: bool = True,
        max_results: int = 1000,
        ablations: int = 0,
        groundedness: GroundednessMode = "measured",
    ) -> None:
        BaseTracer.__init__(self, _schema_format="original+chat")
        self._setup(
            attributor,
            model_name,
            estimator,
            device,
            dispatch_events,
            trace_metadata,
            max_results,
            ablations,
            groundedness,
        )

    def _persist_run(self, run: Run) -> None:
        self._persist_run_sync(run)

    def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID, **kwargs: Any
    ) -> Run:
        run = super().on_chat_model_start(serialized, messages, run_id=run_id, **kwargs)
        self._keep_messages(run_id, messages)
        return run

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> Run:
        """The tracer ends the model run; then each of its prompts with retrieved documents is attributed."""
        run = super().on_llm_end(response, run_id=run_id, **kwargs)
        self._attribute(run)
        return run

    def _attribute(self, run: Run) -> None:
        for job in self._jobs(run):
            event = self._store(self._compute(job), run)
            if self.dispatch_events:
                try:
                    dispatch_custom_event(EVENT_NAME, event)
                except Exception as exc:  # no enclosing runnable (e.g. a bare model call, or a batch step)
                    logger.debug("AT2: custom event not dispatched: %s", exc)


class AsyncAT2CallbackHandler(_AT2Tracker, AsyncBaseTracer):
    __doc__ = (
        "The async variant of `AT2CallbackHandler`: the forward pass runs in a worker thread and the result is "
        "dispatched with `adispatch_custom_event`, so `astream_events` shows `on_custom_event` / `at2_attribution`."
        + _HANDLER_DOC
    )

    name: str = "async_at2_callback_handler"

    def __init__(
        self,
        attributor: Attributor | None = None,
        *,
        model_name: str | None = None,
        estimator: str | None = None,
        device: str | None = None,
        dispatch_events: bool = True,
        trace_metadata: bool = True,
        max_results: int = 1000,
        ablations: int = 0,
        groundedness: GroundednessMode = "measured",
    ) -> None:
        AsyncBaseTracer.__init__(self, _schema_format="original+chat")
        self._setup(
            attributor,
            model_name,
            estimator,
            device,
            dispatch_events,
            trace_metadata,
            max_results,
            ablations,
            groundedness,
        )

    async def _persist_run(self, run: Run) -> None:
        self._persist_run_sync(run)

    async def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID, **kwargs: Any
    ) -> Any:
        await super().on_chat_model_start(serialized, messages, run_id=run_id, **kwargs)
        self._keep_messages(run_id, messages)

    async def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """The tracer ends the model run (completing the `Run` it holds); then each of its prompts with retrieved
        documents is attributed."""
        run = self.run_map.get(str(run_id))
        await super().on_llm_end(response, run_id=run_id, parent_run_id=parent_run_id, tags=tags, **kwargs)
        if run is not None:
            await self._attribute(run)

    async def _attribute(self, run: Run) -> None:
        for job in list(self._jobs(run)):
            result = await run_in_executor(None, self._compute, job)
            event = self._store(result, run)
            if self.dispatch_events:
                try:
                    await adispatch_custom_event(EVENT_NAME, event)
                except Exception as exc:
                    logger.debug("AT2: custom event not dispatched: %s", exc)
