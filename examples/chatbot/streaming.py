"""The answer as server-sent events: `retrieval`, then `token`* and `citation`* (interleaved), `attribution`,
`done` (or one `error`). One answer streams alone while the model is free (`ChatService.stream_slot`); a question
that arrives while another streams or the model is busy (`Attributor.lock` held: a batch runs) waits in the core's
micro-batcher instead and is answered in one batched generation with whoever else waits, its row's text streaming
token by token."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from at2_rag import AT2Error, Attribution, Attributor, Citation, ContextTooLongError, Prepared, get_micro_batcher

from .citations import attribution_payload, citation_payload

if TYPE_CHECKING:
    from .service import ChatService

logger = logging.getLogger("at2_rag.chatbot")


SUBMIT_AFTER_STREAM_S = 0.05  # questions that waited for the streaming answer are submitted together this long after it


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class Cancelled:
    """A stopping criterion that ends generation when the browser goes away (or Stop is pressed by its user)."""

    def __init__(self, user: str | None = None) -> None:
        self.event = threading.Event()
        self.user = user  # who asked: only they may stop it

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def model_busy(attributor: Attributor) -> bool:
    """Whether the model is running something now: its lock (`Attributor.lock`, held by every run and pass on it)
    is taken. Asked from the event loop, which never holds it."""
    lock = attributor.lock
    if not lock.acquire(blocking=False):
        return True
    lock.release()
    return False


async def batched_events(
    service: ChatService, prepared: Prepared, cancel: Cancelled, regenerate: bool
) -> AsyncIterator[str]:
    """One answer through the core's micro-batcher: `token` events as its batch row generates, then its citations
    and attribution (or a `stopped` error when Stop came before it ran). Leaving cancels it in the batcher."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[str] = asyncio.Queue()

    def on_text(chunk: str) -> None:  # in the batch's thread
        loop.call_soon_threadsafe(chunks.put_nowait, chunk)

    while service.stream_slot.locked():
        # the answer streaming alone goes first; every question waiting for it then reaches the batcher at the same
        # instant, a moment after it ended, and shares one batch (submitted as they came, the first could run alone
        # before the stream took the model, and waiters polling apart split across the batcher's window)
        await asyncio.sleep(0.02)
    await asyncio.sleep(max(0.0, service.slot_freed_at + SUBMIT_AFTER_STREAM_S - time.monotonic()))
    batcher = get_micro_batcher(service.attributor)
    future = batcher.submit(prepared, groundedness=service.groundedness, stop=cancel.event, on_text=on_text)
    waiter = asyncio.wrap_future(future)
    try:
        while not waiter.done():
            getter = asyncio.ensure_future(chunks.get())
            await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield sse("token", {"text": getter.result()})
            else:
                getter.cancel()
        while not chunks.empty():  # text handed over just before the answer was scored
            yield sse("token", {"text": chunks.get_nowait()})
        try:
            attribution = waiter.result()
        except (asyncio.CancelledError, concurrent.futures.CancelledError):
            yield sse("error", {"error": "stopped", "message": "You stopped the answer before it was generated."})
            return
    except (asyncio.CancelledError, GeneratorExit):
        batcher.cancel(future)  # the page went away: free its place in the batch (or the queue)
        logger.info("the client went away: its batched answer was cancelled")
        raise
    for citation in attribution.citations:
        yield sse("citation", citation_payload(citation, attribution.support_threshold, attribution.grounded_threshold))
    payload = attribution_payload(attribution)
    payload["stopped"], payload["sampled"], payload["batched"] = cancel.event.is_set(), regenerate, True
    yield sse("attribution", payload)


async def events(
    service: ChatService,
    prepared: Prepared,
    documents: list[Any],
    history: list[dict[str, str]],
    regenerate: bool = False,
    user: str | None = None,
) -> AsyncIterator[str]:
    retrieved = [
        {
            "id": d.id, "title": d.title, "path": d.metadata["path"], "bm25": d.metadata["bm25"],
            "rank": d.metadata["bm25_rank"], "doc_id": d.metadata["doc_id"],
        }
        for d in documents
    ]
    cancel = Cancelled(user)
    stream_id = secrets.token_urlsafe(12)
    service.streams[stream_id] = cancel
    yield sse("retrieval", {"documents": retrieved, "stream_id": stream_id})
    end = object()
    started = time.perf_counter()
    question = prepared.query
    # one answer streams alone with its sentence citations; the slot is taken in the event loop, so of questions
    # arriving together exactly one gets it and the others batch (the model's own lock is taken only later, in
    # the generation thread)
    alone = not model_busy(service.attributor) and service.stream_slot.acquire(blocking=False)
    try:
        if not alone:
            # the model is busy with someone else's answer: wait in the core's micro-batcher, where every question
            # that queues meanwhile joins one batched generation once the model is free; its text streams token by
            # token as the batch generates, Stop ends this row alone (the others go on), and a client that goes
            # away is cancelled wherever its question is (queued, or a row of the running batch)
            yield sse("status", {"message": "Waiting for the model (another answer is being generated)…"})
            async for event in batched_events(service, prepared, cancel, regenerate):
                yield event
            payload_seconds = round(time.perf_counter() - started, 2)
            yield sse("done", {"seconds": payload_seconds, "history_messages": len(history)})
            return
        from transformers import StoppingCriteriaList

        stoppable = dataclasses.replace(
            prepared, generate_kwargs={**prepared.generate_kwargs, "stopping_criteria": StoppingCriteriaList([cancel])}
        )
        stream = service.attributor.stream(stoppable, sentence_citations=True, groundedness=service.groundedness)
        while True:
            item = await run_in_threadpool(next, stream, end)
            if item is end:
                break
            if isinstance(item, Attribution):
                payload = attribution_payload(item)
                payload["stopped"] = cancel.event.is_set()
                payload["sampled"] = regenerate
                yield sse("attribution", payload)
            elif isinstance(item, Citation):  # a sentence just completed: its marks can show now
                yield sse(
                    "citation",
                    citation_payload(item, service.attributor.support_threshold, service.grounded_threshold),
                )
            else:
                yield sse("token", {"text": item})
        yield sse("done", {"seconds": round(time.perf_counter() - started, 2), "history_messages": len(history)})
    except ContextTooLongError as exc:
        message = await run_in_threadpool(service.context_too_long_message, exc, question, documents, history)
        yield sse("error", {"error": "context_too_long", "message": message, "detail": str(exc)})
    except AT2Error as exc:
        yield sse("error", {"error": "invalid_input", "message": str(exc)})
    except (asyncio.CancelledError, GeneratorExit):
        cancel.event.set()  # the page went away: stop generating so the next question is not kept waiting
        logger.info("the client went away: generation stopped")
        raise
    except Exception as exc:  # keep the page informative instead of a silently broken stream
        logger.exception("generation failed")
        yield sse("error", {"error": "internal", "message": f"Generation failed: {type(exc).__name__}: {exc}"})
    finally:
        service.streams.pop(stream_id, None)
        if alone:
            service.slot_freed_at = time.monotonic()
            service.stream_slot.release()


