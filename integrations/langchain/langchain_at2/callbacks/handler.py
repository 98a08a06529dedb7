"""Callback handlers that attribute the answers of existing chains to the documents their retrievers returned.

Attach one to any chain (`config={"callbacks": [handler]}`): it follows every run up to its root run, collects
the documents from `on_retriever_end` and the exact prompt from `on_chat_model_start` / `on_llm_start`, and when
a model call ends after documents were retrieved under the same root it runs one forward pass of the AT2 model
over that prompt and answer, with the documents located inside the prompt (however the chain formatted them).

The chain's own LLM can be any chat model or LLM: the AT2 model (the embedded SmolLM2 unless told otherwise)
reads the same prompt and answer and scores them. That is exact when the chain's LLM *is* the AT2 model, and a
proxy reading otherwise.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from at2_rag import AT2Error, Attribution, Attributor, DocumentsNotLocatedError
from at2_rag.refine import check_ablations
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.callbacks.manager import adispatch_custom_event, dispatch_custom_event
from langchain_core.documents import Document
from langchain_core.messages import BaseMessage
from langchain_core.outputs import LLMResult
from langchain_core.runnables.config import run_in_executor
from pydantic import BaseModel, ConfigDict, Field

from .._loading import get_attributor
from .._messages import last_human_text, to_chat_dicts
from ..annotations import attribution_metadata
from ..documents import to_at2_documents, to_langchain_document

logger = logging.getLogger(__name__)

EVENT_NAME = "at2_attribution"
_QUERY_KEYS = ("question", "query", "input", "q")


class ChainAttribution(BaseModel):
    """The attribution of one model call inside one root run."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    run_id: UUID = Field(description="the root run (what `chain.invoke` created)")
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
        """The attribution as `ChatAT2` writes it into `response_metadata["at2"]` (see
        `langchain_at2.annotations.attribution_metadata`); {} when there is none."""
        if self.attribution is None:
            return {}
        return attribution_metadata(self.attribution, mode="prompt", unlocated=self.unlocated)

    def to_event(self) -> dict[str, Any]:
        """The JSON-friendly payload of the `at2_attribution` custom event."""
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
                unlocated_documents=list(self.unlocated),
                extra_forward_passes=0,
                context_scores={},
                context_sources=[],
            )
        return data


def _query_from_inputs(inputs: Any) -> str | None:
    if isinstance(inputs, str):
        return inputs
    if isinstance(inputs, dict):
        for key in _QUERY_KEYS:
            if isinstance(inputs.get(key), str):
                return inputs[key]
    return None


class _AT2Tracker:
    """Run-tree bookkeeping and the attribution itself, shared by the sync and async handlers."""

    def __init__(
        self,
        attributor: Attributor | None = None,
        *,
        model_name: str | None = None,
        estimator: str | None = None,
        device: str | None = None,
        dispatch_events: bool = True,
        max_results: int = 1000,
        ablations: int = 0,
    ) -> None:
        self.ablations = check_ablations(ablations)
        """ablation passes that refine each attribution (0 = plain AT2: one forward pass per model call)"""
        self._attributor = attributor
        self._model_args = {"estimator": estimator, "device": device}
        self._model_name = model_name
        self.dispatch_events = dispatch_events
        self.max_results = max_results
        self.results: OrderedDict[UUID, ChainAttribution] = OrderedDict()
        """root run id -> the attribution of the last model call under it that had documents"""
        self.llm_results: OrderedDict[UUID, ChainAttribution] = OrderedDict()
        """model-call run id -> its attribution"""
        self._lock = threading.RLock()
        self._parent: dict[UUID, UUID | None] = {}
        self._members: dict[UUID, set[UUID]] = {}
        self._root_inputs: dict[UUID, Any] = {}
        self._documents: dict[UUID, list[Document]] = {}
        self._prompts: dict[UUID, tuple[str, list[Any]]] = {}

    @property
    def attributor(self) -> Attributor:
        if self._attributor is None:
            self._attributor = get_attributor(self._model_name, **self._model_args)
        return self._attributor

    # ---- run tree -------------------------------------------------------------------------------------------
    def _root(self, run_id: UUID) -> UUID:
        seen = set()
        while run_id not in seen:
            seen.add(run_id)
            parent = self._parent.get(run_id)
            if parent is None:
                return run_id
            run_id = parent
        return run_id  # pragma: no cover - cycles cannot happen in LangChain's run tree

    def _track(self, run_id: UUID, parent_run_id: UUID | None) -> UUID:
        with self._lock:
            self._parent[run_id] = parent_run_id
            root = self._root(run_id)
            self._members.setdefault(root, set()).add(run_id)
            return root

    def _forget(self, root: UUID) -> None:
        with self._lock:
            for run in self._members.pop(root, {root}):
                self._parent.pop(run, None)
                self._prompts.pop(run, None)
            self._parent.pop(root, None)
            self._root_inputs.pop(root, None)
            self._documents.pop(root, None)

    def _chain_start(self, inputs: Any, run_id: UUID, parent_run_id: UUID | None) -> None:
        self._track(run_id, parent_run_id)
        if parent_run_id is None:
            with self._lock:
                self._root_inputs[run_id] = inputs

    def _retriever_end(self, documents: Sequence[Document], run_id: UUID, parent_run_id: UUID | None) -> None:
        root = self._track(run_id, parent_run_id)
        with self._lock:
            self._documents.setdefault(root, []).extend(documents)

    def _prompt_start(self, kind: str, prompts: list[Any], run_id: UUID, parent_run_id: UUID | None) -> None:
        self._track(run_id, parent_run_id)
        with self._lock:
            self._prompts[run_id] = (kind, list(prompts))

    def _collect(self, response: LLMResult, run_id: UUID, parent_run_id: UUID | None) -> list[dict[str, Any]]:
        """Everything one finished model call needs for attribution (taken under the lock, computed outside)."""
        with self._lock:
            root = self._root(run_id) if run_id in self._parent else run_id
            prompt = self._prompts.pop(run_id, None)
            documents = list(self._documents.get(root, []))
            inputs = self._root_inputs.get(root)
        if prompt is None or not documents:
            return []
        kind, prompts = prompt
        jobs = []
        for i, payload in enumerate(prompts):
            generations = response.generations[i] if i < len(response.generations) else []
            if not generations:
                continue
            answer = generations[0].text
            if kind == "chat":
                messages: list[BaseMessage] = payload
                rendered: Any = to_chat_dicts(messages)
                fallback = last_human_text(messages)
            else:
                rendered, fallback = str(payload), ""
            jobs.append(
                {
                    "root": root,
                    "llm_run_id": run_id,
                    "prompt": rendered,
                    "answer": answer,
                    "documents": documents,
                    "query": _query_from_inputs(inputs) or fallback,
                }
            )
        return jobs

    def _compute(self, job: dict[str, Any]) -> ChainAttribution:
        documents = to_at2_documents(job["documents"])
        attribution: Attribution | None = None
        unlocated: list[dict[str, Any]] = []
        error = None
        if not job["answer"].strip():
            error = "the model's answer is empty"
        else:
            try:
                attribution = self.attributor.attribute_rendered(
                    job["prompt"], documents, job["answer"], job["query"], ablations=self.ablations
                )
                unlocated = [u.to_dict() for u in attribution.unlocated_documents]
            except DocumentsNotLocatedError as exc:
                unlocated = [u.to_dict() for u in exc.unlocated]
                error = f"none of the {len(documents)} retrieved documents occurs in the prompt"
            except (AT2Error, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        if unlocated:
            logger.warning(
                "AT2: %d of %d retrieved documents were not found in the prompt of run %s and get no score: %s",
                len(unlocated),
                len(documents),
                job["llm_run_id"],
                "; ".join(f"{u['id']}: {u['reason']}" for u in unlocated),
            )
        if error:
            logger.warning("AT2: no attribution for run %s: %s", job["llm_run_id"], error)
        scores = attribution.document_scores() if attribution else {}
        return ChainAttribution(
            run_id=job["root"],
            llm_run_id=job["llm_run_id"],
            query=job["query"],
            answer=job["answer"],
            attribution=attribution,
            documents=[to_langchain_document(d, at2_score=scores.get(d.id)) for d in documents],
            unlocated=unlocated,
            error=error,
        )

    def _store(self, result: ChainAttribution) -> None:
        with self._lock:
            for table, key in ((self.results, result.run_id), (self.llm_results, result.llm_run_id)):
                table[key] = result
                table.move_to_end(key)
                while len(table) > self.max_results:
                    table.popitem(last=False)

    def _end(self, run_id: UUID, parent_run_id: UUID | None) -> None:
        if parent_run_id is None:
            self._forget(run_id)


class AT2CallbackHandler(_AT2Tracker, BaseCallbackHandler):
    """Attribute the answers of any chain that retrieves documents and then calls a model.

    ```python
    handler = AT2CallbackHandler()              # the embedded SmolLM2 scores (or pass attributor=...)
    answer = chain.invoke("question?", config={"callbacks": [handler]})
    result = handler.results[run_id]            # ChainAttribution: .scores, .attribution, .unlocated
    ```
    Root run ids come from `config={"run_id": ...}`, `collect_runs()`, or `handler.results` (insertion
    ordered). Each result is also dispatched as the custom event `"at2_attribution"` (see `astream_events`)
    when the model call runs inside a chain. Thread safe: one handler can serve concurrent invocations.

    `AT2CallbackHandler(ablations=k)` pays k ablation passes per attributed model call to refine the scores
    (0, the default, is plain AT2); the event's `extra_forward_passes` says how many were paid.
    """

    def on_chain_start(
        self, serialized: Any, inputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._chain_start(inputs, run_id, parent_run_id)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        self._end(run_id, parent_run_id)

    def on_chain_error(
        self, error: BaseException, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._end(run_id, parent_run_id)

    def on_retriever_start(
        self, serialized: Any, query: str, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._track(run_id, parent_run_id)

    def on_retriever_end(
        self, documents: Sequence[Document], *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._retriever_end(documents, run_id, parent_run_id)

    def on_chat_model_start(
        self,
        serialized: Any,
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        self._prompt_start("chat", messages, run_id, parent_run_id)

    def on_llm_start(
        self, serialized: Any, prompts: list[str], *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._prompt_start("text", prompts, run_id, parent_run_id)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        for job in self._collect(response, run_id, parent_run_id):
            result = self._compute(job)
            self._store(result)
            if self.dispatch_events:
                try:
                    dispatch_custom_event(EVENT_NAME, result.to_event())
                except Exception as exc:  # no enclosing runnable (e.g. a bare model call, or a batch step)
                    logger.debug("AT2: custom event not dispatched: %s", exc)
        self._end(run_id, parent_run_id)

    def on_llm_error(
        self, error: BaseException, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        with self._lock:
            self._prompts.pop(run_id, None)
        self._end(run_id, parent_run_id)


class AsyncAT2CallbackHandler(_AT2Tracker, AsyncCallbackHandler):
    """The async variant of `AT2CallbackHandler`: the forward pass runs in a worker thread and the result is
    dispatched with `adispatch_custom_event`, so `astream_events` shows `on_custom_event` / `at2_attribution`."""

    async def on_chain_start(
        self, serialized: Any, inputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._chain_start(inputs, run_id, parent_run_id)

    async def on_chain_end(
        self, outputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._end(run_id, parent_run_id)

    async def on_chain_error(
        self, error: BaseException, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._end(run_id, parent_run_id)

    async def on_retriever_start(
        self, serialized: Any, query: str, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._track(run_id, parent_run_id)

    async def on_retriever_end(
        self, documents: Sequence[Document], *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._retriever_end(documents, run_id, parent_run_id)

    async def on_chat_model_start(
        self,
        serialized: Any,
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        self._prompt_start("chat", messages, run_id, parent_run_id)

    async def on_llm_start(
        self, serialized: Any, prompts: list[str], *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._prompt_start("text", prompts, run_id, parent_run_id)

    async def on_llm_end(
        self, response: LLMResult, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        for job in self._collect(response, run_id, parent_run_id):
            result = await run_in_executor(None, self._compute, job)
            self._store(result)
            if self.dispatch_events:
                try:
                    await adispatch_custom_event(EVENT_NAME, result.to_event())
                except Exception as exc:
                    logger.debug("AT2: custom event not dispatched: %s", exc)
        self._end(run_id, parent_run_id)

    async def on_llm_error(
        self, error: BaseException, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        with self._lock:
            self._prompts.pop(run_id, None)
        self._end(run_id, parent_run_id)
