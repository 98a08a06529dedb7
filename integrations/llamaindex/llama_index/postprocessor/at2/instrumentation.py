"""Attribute the answer of any LlamaIndex query engine or chat engine, whatever its LLM.

`instrument_at2()` registers a span handler and an event handler on LlamaIndex's root dispatcher
(`llama_index.core.instrumentation`). For every engine call (`query`, `aquery`, `chat`, `achat`, `stream_chat`,
...) they collect, keyed by the instrumentation span ids:

- the nodes of every `RetrievalEndEvent` inside it,
- every top-level LLM call inside it (`LLMChatStartEvent` with the exact messages, or `LLMCompletionStartEvent`
  with the exact prompt, and the matching end event with the LLM's answer; a completion nested inside a chat
  call of the same LLM, as `CustomLLM.chat` does, belongs to the chat call),

and when the engine call ends they attribute the engine's own answer: the last LLM call's prompt (or messages) and
answer go to `Attributor.attribute_rendered`, with the response's source nodes (the nodes the synthesizer was
given; the retrieved nodes when the response has none) located inside that prompt. The result goes where
LlamaIndex users look: `response.metadata["at2"]` (`Attribution.to_dict()`), `response.source_nodes` ranked by
AT2 with the scores on them (see `AT2CitationQueryEngine`). Streaming responses are filled in when the stream
ends (the LLM's end event). Everything kept for a call is dropped when it ends.

The engine's LLM can be any LLM: the AT2 model (the embedded SmolLM2 unless told otherwise) reads the same prompt
and the same answer and scores them, one forward pass per answer (plus `ablations`). That is exact when the LLM
*is* the AT2 model, and a proxy reading otherwise. `AT2CitationQueryEngine` attributes its own answers and is
skipped.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.chat_engine.types import BaseChatEngine
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.base import BaseEvent
from llama_index.core.instrumentation.events.llm import (
    LLMChatEndEvent,
    LLMChatStartEvent,
    LLMCompletionEndEvent,
    LLMCompletionStartEvent,
)
from llama_index.core.instrumentation.events.retrieval import RetrievalEndEvent
from llama_index.core.instrumentation.span import active_span_id
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from llama_index.core.schema import NodeWithScore, QueryBundle

from ._common import annotate_nodes, chat_dicts, default_attributor, map_nodes, rank_nodes, response_metadata
from .events import AT2_EVENTS, AT2AttributionEndEvent, AT2AttributionStartEvent, dispatcher

logger = logging.getLogger(__name__)

ENGINE_METHODS = frozenset({"query", "aquery", "chat", "achat", "stream_chat", "astream_chat"})
_QUERY_ARGS = ("str_or_query_bundle", "message", "query", "query_str")
SOURCE = "instrumentation"


@dataclass
class _LLMCall:
    span_id: str
    prompt: str | list[dict[str, str]]
    seq: int = 0  # when it started, in the engine call's event order
    answer: str | None = None


@dataclass
class _EngineCall:
    """What one engine call has seen so far (everything under its span)."""

    span_id: str
    query: str
    skip: bool
    members: set = field(default_factory=set)
    retrieved: list[NodeWithScore] = field(default_factory=list)
    llm_calls: dict[str, _LLMCall] = field(default_factory=dict)
    last_call: _LLMCall | None = None
    result: Any = None  # a streaming response waiting for its LLM call to end
    child_metadata: dict[str, Any] | None = None
    seq: int = 0  # events seen
    retrieval_seq: int = -1  # when the last retrieval ended
    awaits_answer: bool = False  # a streaming chat response: finished by its answer's LLM end event

    def answer_done(self) -> bool:
        """The answer's LLM call (one that started after the last retrieval) has ended, and no call is open."""
        calls = self.llm_calls.values()
        answered = any(c.seq > self.retrieval_seq and c.answer is not None for c in calls)
        return answered and all(c.answer is not None for c in calls)


def _is_engine(instance: Any) -> bool:
    return isinstance(instance, (BaseQueryEngine, BaseChatEngine))


def _method(span_id: str) -> str:
    """`ContextChatEngine.chat-<uuid>` -> `chat`."""
    return span_id.split("-", 1)[0].rsplit(".", 1)[-1]


def _query_of(bound_args: inspect.BoundArguments) -> str:
    for name in _QUERY_ARGS:
        value = bound_args.arguments.get(name)
        if isinstance(value, QueryBundle):
            return value.query_str
        if isinstance(value, str):
            return value
    return ""


def _is_streaming(result: Any) -> bool:
    return type(result).__name__ in {"StreamingResponse", "AsyncStreamingResponse", "StreamingAgentChatResponse"}


class _Tracker:
    """The bookkeeping shared by the span handler and the event handler (one lock, state keyed by span ids)."""

    def __init__(self, owner: AT2Instrumentation, max_pending_streams: int) -> None:
        self.owner = owner
        self.lock = threading.RLock()
        self.parent: dict[str, str | None] = {}
        self.engine_of: dict[str, str] = {}  # span id -> the engine call it belongs to
        self.engines: dict[str, _EngineCall] = {}
        self.instance_of: dict[str, int] = {}  # engine span id -> id(engine)
        self.pending: OrderedDict[str, _EngineCall] = OrderedDict()  # streams waiting for their LLM's end
        self.max_pending_streams = max_pending_streams

    # ---- spans ------------------------------------------------------------------------------------------------
    def enter(self, id_: str, bound_args: inspect.BoundArguments, instance: Any, parent_id: str | None) -> None:
        with self.lock:
            owner = self.engine_of.get(parent_id) if parent_id is not None else None
            starts_engine = (
                _is_engine(instance)
                and _method(id_) in ENGINE_METHODS
                and (owner is None or self.instance_of.get(owner) != id(instance))
            )
            if starts_engine:
                from .query_engine import AT2CitationQueryEngine

                call = _EngineCall(
                    span_id=id_, query=_query_of(bound_args), skip=isinstance(instance, AT2CitationQueryEngine)
                )
                self.engines[id_] = call
                self.instance_of[id_] = id(instance)
                owner = id_
            if owner is None:
                return  # outside every engine call: nothing to keep
            self.parent[id_] = parent_id
            self.engine_of[id_] = owner
            self.engines[owner].members.add(id_)

    def exit(self, id_: str, result: Any) -> None:
        with self.lock:
            call = self.engines.get(id_)
            if call is None or call.span_id != id_:
                return
            parent_engine = self.engine_of.get(self.parent.get(id_) or "")
            if call.skip:
                self._forget(call)
                return
            if _is_streaming(result) and not (
                type(result).__name__ == "StreamingAgentChatResponse" and call.answer_done()
            ):
                if not self._watch_stream(call, result):
                    logger.info("AT2: %s is not attributed (an unknown streaming response)", id_)
                    self._forget(call)
                return
            self._forget(call)
        metadata = self.owner.finish(call, result)
        if parent_engine is not None and metadata:
            with self.lock:
                outer = self.engines.get(parent_engine)
                if outer is not None:
                    outer.child_metadata = metadata

    # ---- streaming responses: the synthesizer calls the LLM only when the stream is consumed, after the
    # engine's span has ended. The stream is wrapped so that the LLM call runs inside the engine's span (its
    # events are paired with the engine call) and the attribution is written when the stream ends.
    def _watch_stream(self, call: _EngineCall, result: Any) -> bool:
        gen = getattr(result, "response_gen", None)
        if type(result).__name__ == "StreamingResponse" and inspect.isgenerator(gen):
            result.response_gen = self._sync_stream(call, result, gen)
        elif type(result).__name__ == "AsyncStreamingResponse" and inspect.isasyncgen(gen):
            result.response_gen = self._async_stream(call, result, gen)
        elif type(result).__name__ == "StreamingAgentChatResponse":
            # chat engines consume their stream in a thread (or task) started inside their span, which copies
            # the context: the answer's LLM call is paired with the engine call, and its end event finishes it
            call.awaits_answer = True
        else:
            return False
        call.result = result
        self.pending[call.span_id] = call
        while len(self.pending) > self.max_pending_streams:
            _, old = self.pending.popitem(last=False)
            logger.warning("AT2: a streaming response was never consumed; its attribution is dropped")
            self._forget(old)
        return True

    def _stream_ended(self, call: _EngineCall, complete: bool) -> None:
        with self.lock:
            if call.span_id not in self.pending:
                return  # dropped (too many unconsumed streams)
            self._forget(call)
        if complete:
            self.owner.finish(call, call.result)

    def _sync_stream(self, call: _EngineCall, result: Any, gen: Any) -> Any:
        complete = False
        try:
            while True:
                token = active_span_id.set(call.span_id)
                try:
                    item = next(gen)
                except StopIteration:
                    complete = True
                    return
                finally:
                    active_span_id.reset(token)
                yield item
        finally:
            self._stream_ended(call, complete)

    async def _async_stream(self, call: _EngineCall, result: Any, gen: Any) -> Any:
        complete = False
        try:
            while True:
                token = active_span_id.set(call.span_id)
                try:
                    item = await gen.__anext__()
                except StopAsyncIteration:
                    complete = True
                    return
                finally:
                    active_span_id.reset(token)
                yield item
        finally:
            if complete:  # the attribution's forward pass runs off the event loop
                await asyncio.to_thread(self._stream_ended, call, True)
            else:
                self._stream_ended(call, False)

    def drop(self, id_: str) -> None:
        with self.lock:
            call = self.engines.get(id_)
            if call is not None and call.span_id == id_:
                self._forget(call)

    def _forget(self, call: _EngineCall) -> None:
        self.engines.pop(call.span_id, None)
        self.instance_of.pop(call.span_id, None)
        self.pending.pop(call.span_id, None)
        for member in call.members | {call.span_id}:
            self.parent.pop(member, None)
            self.engine_of.pop(member, None)

    def open_calls(self) -> int:
        with self.lock:
            return len(self.engines)

    # ---- events -----------------------------------------------------------------------------------------------
    def _call_of(self, span_id: str | None) -> _EngineCall | None:
        owner = self.engine_of.get(span_id or "")
        return self.engines.get(owner) if owner is not None else None

    def _inside_llm_call(self, call: _EngineCall, span_id: str) -> bool:
        """Whether an enclosing span (not this one) is an LLM call already recorded (CustomLLM.chat -> complete)."""
        node = self.parent.get(span_id)
        while node is not None and node in call.members:
            if node in call.llm_calls and call.llm_calls[node].answer is None:
                return True
            node = self.parent.get(node)
        return False

    def event(self, event: BaseEvent) -> None:
        if isinstance(event, AT2_EVENTS):
            return
        finished: _EngineCall | None = None
        with self.lock:
            call = self._call_of(event.span_id)
            if call is None or call.skip:
                return
            span_id = event.span_id or ""
            call.seq += 1
            if isinstance(event, RetrievalEndEvent):
                call.retrieved.extend(event.nodes)
                call.retrieval_seq = call.seq
            elif isinstance(event, (LLMChatStartEvent, LLMCompletionStartEvent)):
                if not self._inside_llm_call(call, span_id):
                    prompt = event.prompt if isinstance(event, LLMCompletionStartEvent) else chat_dicts(event.messages)
                    call.llm_calls[span_id] = _LLMCall(span_id=span_id, prompt=prompt, seq=call.seq)
            elif isinstance(event, (LLMChatEndEvent, LLMCompletionEndEvent)):
                llm_call = call.llm_calls.get(span_id)
                if llm_call is not None and llm_call.answer is None:
                    if isinstance(event, LLMChatEndEvent):
                        llm_call.answer = (event.response.message.content or "") if event.response else ""
                    else:
                        llm_call.answer = event.response.text or ""
                    call.last_call = llm_call
                    if call.awaits_answer and call.span_id in self.pending and call.answer_done():
                        self._forget(call)
                        finished = call
                elif llm_call is None and not self._inside_llm_call(call, span_id):
                    logger.debug("AT2: an LLM end event without its start event (span %s)", span_id)
        if finished is not None:  # a streaming chat response's answer has ended (in the engine's stream thread)
            self.owner.finish(finished, finished.result)


class _AT2SpanHandler(BaseSpanHandler[Any]):
    _tracker: Any = PrivateAttr(default=None)

    @classmethod
    def class_name(cls) -> str:
        return "AT2SpanHandler"

    def new_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_span_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            self._tracker.enter(id_, bound_args, instance, parent_span_id)
        except Exception:  # the dispatcher swallows handler errors: say so
            logger.exception("AT2: span bookkeeping failed for %s", id_)
        return None  # no span object: the base class keeps nothing

    def prepare_to_exit_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            self._tracker.exit(id_, result)
        except Exception:
            logger.exception("AT2: attribution failed for %s", id_)
        return None

    def prepare_to_drop_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> None:
        self._tracker.drop(id_)
        return None


class _AT2EventHandler(BaseEventHandler):
    _tracker: Any = PrivateAttr(default=None)

    @classmethod
    def class_name(cls) -> str:
        return "AT2EventHandler"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        try:
            self._tracker.event(event)
        except Exception:
            logger.exception("AT2: event bookkeeping failed for %s", type(event).__name__)


class AT2Instrumentation:
    """The handlers `instrument_at2()` registers, and the attribution they run. `uninstrument()` removes them."""

    def __init__(
        self,
        attributor: Any = None,
        *,
        ablations: int = 0,
        groundedness: str = "measured",
        top_sentences: int = 3,
        max_pending_streams: int = 64,
    ) -> None:
        from at2_rag.evidence.ablations import check_ablations
        from at2_rag.evidence.groundedness import check_groundedness

        self.ablations = check_ablations(ablations)
        self.groundedness = check_groundedness(groundedness)
        self.top_sentences = top_sentences
        self._attributor = attributor
        self._tracker = _Tracker(self, max_pending_streams)
        self.span_handler = _AT2SpanHandler()
        self.span_handler._tracker = self._tracker
        self.event_handler = _AT2EventHandler()
        self.event_handler._tracker = self._tracker
        self._dispatcher: Any = None

    @property
    def attributor(self) -> Any:
        if self._attributor is None:
            self._attributor = default_attributor()
        return self._attributor

    @property
    def open_calls(self) -> int:
        """Engine calls in flight (or streams not yet consumed): 0 once every query has ended."""
        return self._tracker.open_calls()

    def install(self, root: Any = None) -> AT2Instrumentation:
        root = root if root is not None else get_dispatcher()
        root.add_span_handler(self.span_handler)
        root.add_event_handler(self.event_handler)
        self._dispatcher = root
        return self

    def uninstrument(self) -> None:
        """Remove both handlers from the dispatcher (idempotent)."""
        root, self._dispatcher = self._dispatcher, None
        if root is None:
            return
        root.span_handlers = [h for h in root.span_handlers if h is not self.span_handler]
        root.event_handlers = [h for h in root.event_handlers if h is not self.event_handler]
        with _REGISTRY_LOCK:
            if self in _REGISTRY:
                _REGISTRY.remove(self)

    # ---- the attribution --------------------------------------------------------------------------------------
    def finish(self, call: _EngineCall, result: Any) -> dict[str, Any] | None:
        """Attribute the engine call's answer and write it into `result`; returns the metadata written."""
        if result is None or not hasattr(result, "source_nodes"):
            return None
        llm_call = call.last_call
        nodes: Sequence[NodeWithScore] = list(result.source_nodes or []) or call.retrieved
        if llm_call is None or llm_call.answer is None or not nodes:
            if call.child_metadata is not None and not (getattr(result, "metadata", None) or {}).get("at2"):
                # a chat engine around a query engine (CondenseQuestionChatEngine): the inner answer is the answer
                result.metadata = {**(getattr(result, "metadata", None) or {}), **call.child_metadata}
                return call.child_metadata
            return None
        mapped = map_nodes(nodes)
        query = call.query
        dispatcher.event(
            AT2AttributionStartEvent(
                source=SOURCE, query=query, document_ids=[d.id for d in mapped.documents], span_id=call.span_id
            )
        )
        error: str | None = None
        attribution = None
        if not llm_call.answer.strip():
            error = "the LLM's answer is empty"
        else:
            try:
                attribution = self.attributor.attribute_rendered(
                    llm_call.prompt,
                    mapped.documents,
                    answer=llm_call.answer,
                    query=query,
                    ablations=self.ablations,
                    groundedness=self.groundedness,
                )
            except Exception as exc:  # DocumentsNotLocatedError, a prompt too long for the AT2 model, ...
                error = f"{type(exc).__name__}: {exc}"
        metadata = dict(getattr(result, "metadata", None) or {})
        if attribution is None:
            logger.warning("AT2: no attribution for %s: %s", call.span_id, error)
            metadata.update(at2=None, at2_error=error, at2_complete=True)
            result.metadata = metadata
            dispatcher.event(AT2AttributionEndEvent(source=SOURCE, query=query, error=error, span_id=call.span_id))
            return None
        data = attribution.to_dict()
        if attribution.unlocated_documents:
            logger.warning(
                "AT2: %d of %d nodes were not found in the LLM's prompt and get no score: %s",
                len(attribution.unlocated_documents),
                len(mapped.documents),
                "; ".join(f"{u.id}: {u.reason}" for u in attribution.unlocated_documents),
            )
        ranked = rank_nodes(annotate_nodes(mapped.nodes, attribution, self.top_sentences, data=data))
        if isinstance(result.source_nodes, list):
            result.source_nodes[:] = ranked  # in place: the chat engine's ToolOutput shares the list
        else:
            result.source_nodes = ranked
        added = response_metadata(attribution, data)
        metadata.update(added)
        result.metadata = metadata
        dispatcher.event(
            AT2AttributionEndEvent(
                source=SOURCE,
                query=query,
                scores=attribution.document_scores(),
                attribution=data,
                span_id=call.span_id,
            )
        )
        return added


_REGISTRY: list[AT2Instrumentation] = []
_REGISTRY_LOCK = threading.Lock()


def instrument_at2(
    attributor: Any = None, *, ablations: int = 0, groundedness: str = "measured", top_sentences: int = 3
) -> AT2Instrumentation:
    """Attribute every query engine's and chat engine's answer from now on (see the module docstring).

    ```python
    from llama_index.postprocessor.at2 import instrument_at2

    at2 = instrument_at2()                      # the embedded SmolLM2 scores (or pass attributor=...)
    response = index.as_query_engine(llm=any_llm).query("Who discovered penicillin?")
    response.metadata["at2"]["documents"]        # Attribution.to_dict(): scores, sentences, citations
    response.source_nodes                        # ranked by AT2, node.metadata["at2_score"], ...
    at2.uninstrument()
    ```

    Calling it again with the same arguments returns the handlers already registered (an engine is attributed
    once). `ablations=k` pays k ablation passes per answer to refine the scores.

    `groundedness="measured"` (the default) measures how much each answer sentence depends on the nodes (the drop
    of its log-odds when every node is removed from attention; dependence, not truth) with one extra
    teacher-forced pass over the non-document part of the LLM's prompt and its answer (one more, removing the
    earlier turns, for a chat engine's conversation); "estimated" predicts it at zero cost (less reliable on
    documents unlike the estimator's training data); "off" skips it. A bad value raises
    `at2_rag.InvalidInputError`.
    """
    from at2_rag.evidence.groundedness import check_groundedness

    check_groundedness(groundedness)
    with _REGISTRY_LOCK:
        for existing in _REGISTRY:
            if (
                (attributor is None or existing._attributor is attributor)
                and existing.ablations == ablations
                and existing.groundedness == groundedness
                and existing.top_sentences == top_sentences
            ):
                return existing
        if _REGISTRY:
            raise RuntimeError(
                "AT2 instrumentation is already registered with other settings: call .uninstrument() on it first"
            )
        at2 = AT2Instrumentation(
            attributor, ablations=ablations, groundedness=groundedness, top_sentences=top_sentences
        ).install()
        _REGISTRY.append(at2)
        return at2
