"""Micro-batching for concurrent callers: requests that arrive within a short window share one batch.

Each model runs one batch at a time (its lock), so concurrent callers of `generate` wait for one another; a
`MicroBatcher` instead collects what arrives within `max_wait_ms` (up to `max_batch_size` requests with the same
settings) and runs it as one `generate_batch` / `attribute_batch`. Each caller gets exactly its own result (the
batch path equals the single path) or its own error: a bad request never fails the others in its batch.
Streaming stays per request (`Attributor.stream`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any

from ..attribution.result import Attribution
from ..attributor import Attributor, RequestLike
from ..capture.hooks import RunHooks
from ..errors import AT2Error, InvalidInputError
from ..evidence.ablations import check_ablations
from ..evidence.groundedness import GroundednessMode, check_groundedness
from ..prompting.prepared import Prepared
from ..prompting.request import AttributionRequest

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_MAX_WAIT_MS = 10.0


@dataclass
class _Pending:
    prepared: Prepared  # prepared in the caller's thread: bad input fails there, at once
    settings: tuple[Any, ...]  # requests batch together only with equal settings
    future: Future
    ablations: int
    groundedness: GroundednessMode = "measured"  # scoring only: requests of any mode share a batch
    arrived: float = field(default_factory=time.perf_counter)
    stop: threading.Event | None = None  # the caller's: set, the answer stops where it is (and is still scored)
    on_text: Callable[[str], None] | None = None
    halted: threading.Event = field(default_factory=threading.Event)  # `cancel`: stop, and nobody wants the result

    def stopping(self) -> bool:
        return self.halted.is_set() or (self.stop is not None and self.stop.is_set())

    def hooks(self) -> RunHooks:
        return RunHooks(should_stop=self.stopping, on_text=self.on_text)

    def wanted(self) -> bool:
        return not self.halted.is_set()


_Outcome = tuple[_Pending, Any, BaseException | None]  # a request, its result, or its own error


@dataclass(frozen=True)
class BatchItem:
    """One request of a batch: prepared (or a request, prepared and so checked inside the batch) and the evidence
    its caller asked for."""

    request: Prepared | AttributionRequest
    ablations: int = 0
    groundedness: GroundednessMode = "measured"
    max_new_tokens: int = 256  # for a request prepared inside the batch
    hooks: RunHooks | None = None  # stop this row early, stream its text (`RunHooks`)
    wanted: Callable[[], bool] | None = None  # False once its caller is gone: its result is not scored


@dataclass(frozen=True)
class BatchAttempt:
    """One call to the model: how many requests it ran, how long it took, whether it re-ran a request of a failed
    batch alone, and whether it succeeded."""

    size: int
    seconds: float
    retry: bool
    ok: bool


def run_batch(attributor: Attributor, items: Sequence[BatchItem]) -> tuple[list[Any], list[BatchAttempt]]:
    """The batching policy every server shares (MicroBatcher, the Ray Serve example): run requests with equal
    settings as one left-padded batch; if the batch raises, run each request alone, so each gets its own
    Attribution or its own error (returned, not raised) and a bad request never fails the others. Returns the
    outcomes in order and every model call made."""
    attempts: list[BatchAttempt] = []
    if len(items) > 1:
        started = time.perf_counter()
        try:
            runs = attributor.run([_prepared(attributor, item) for item in items], hooks=[i.hooks for i in items])
            results: list[Any] = [_scored(attributor, run, item) for run, item in zip(runs, items)]
        except Exception as exc:  # noqa: BLE001 - one bad request must not fail the others: retry one by one
            attempts.append(BatchAttempt(len(items), time.perf_counter() - started, retry=False, ok=False))
            if not isinstance(exc, AT2Error):
                logger.warning("a batch of %d failed (%s); running its requests one by one", len(items), exc)
        else:
            attempts.append(BatchAttempt(len(items), time.perf_counter() - started, retry=False, ok=True))
            return results, attempts
    outcomes: list[Any] = []
    for item in items:
        started = time.perf_counter()
        try:
            run = attributor.run(_prepared(attributor, item), hooks=item.hooks)
            outcomes.append(_scored(attributor, run, item))
        except Exception as exc:  # noqa: BLE001 - handed to its own caller
            outcomes.append(exc)
        ok = not isinstance(outcomes[-1], BaseException)
        attempts.append(BatchAttempt(1, time.perf_counter() - started, retry=len(items) > 1, ok=ok))
    return outcomes, attempts


def _prepared(attributor: Attributor, item: BatchItem) -> Prepared:
    if isinstance(item.request, Prepared):
        return item.request
    return attributor.prepare(item.request, max_new_tokens=item.max_new_tokens)


def _scored(attributor: Attributor, run: Any, item: BatchItem) -> Any:
    """The request's evidence (its groundedness mode, its ablations), then its Attribution; a request whose caller
    is gone is not scored (its evidence passes would only keep the model from the others)."""
    if item.wanted is not None and not item.wanted():
        return CancelledError("the request was cancelled while it ran")
    evidence = attributor.gather_evidence(run, item.groundedness, item.ablations)
    return attributor.score(run, evidence, item.groundedness)


@dataclass
class BatchStats:
    """What the batcher has run, in order (for benchmarks and tests): the size of every batch, and why each
    batch stopped collecting: "full", "window" (its wait ended), "expected" (the callers of the batch before
    came back), "busy" (requests queued while the model was busy joined it) or "closed"."""

    batch_sizes: list[int] = field(default_factory=list)
    closed_by: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.batch_sizes)


class MicroBatcher:
    """Serve concurrent `generate` / `attribute` calls on one Attributor in shared batches.

    Thread-safe; `generate`/`attribute` block the caller, `agenerate`/`aattribute` await without blocking the
    event loop, `submit` returns a `concurrent.futures.Future`. A request carrying an `answer` is attributed
    (one forward pass), else its answer is generated. Use as a context manager, or call `close()`.
    """

    def __init__(
        self,
        attributor: Attributor,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    ) -> None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise InvalidInputError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        if not isinstance(max_wait_ms, (int, float)) or not 0 <= max_wait_ms < 60_000:
            raise InvalidInputError(f"max_wait_ms must be between 0 and 60000, got {max_wait_ms!r}")
        self.attributor = attributor
        self.max_batch_size = max_batch_size
        self.max_wait_ms = float(max_wait_ms)
        self.stats = BatchStats()
        self._submitted: dict[Future, _Pending] = {}  # running or queued, for `cancel`
        self._guard = threading.Lock()
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._closed = False
        self._last_batch_end = 0.0
        self._expected = max_batch_size  # requests the last batch's callers and those queued behind it make
        self._worker = threading.Thread(target=self._serve, name="at2-micro-batcher", daemon=True)
        self._worker.start()

    # ---- callers ------------------------------------------------------------------------------------------
    def submit(
        self,
        request: RequestLike | Prepared,
        max_new_tokens: int = 256,
        ablations: int = 0,
        groundedness: GroundednessMode = "measured",
        *,
        stop: threading.Event | None = None,
        on_text: Callable[[str], None] | None = None,
        **generate_kwargs: Any,
    ) -> Future:
        """Queue a request; the Future resolves to its Attribution (or raises its own error). A request is
        prepared here (`Attributor.prepare`), so malformed input raises in the caller's thread; a `Prepared` one
        (e.g. a prompt rendered elsewhere, `Attributor.prepare(messages, documents)`) is queued as it is, with its
        own settings. A request carrying an answer is attributed with one forward pass, else its answer is
        generated. `groundedness` as in `Attributor.generate`.

        `stop` (an event the caller sets) ends the answer where it is, also as one row of a running batch while the
        others go on; the shorter answer is still attributed (`finish_reason="stopped"`); set before the request
        ran, it never runs (the Future raises `CancelledError`). `on_text(chunk)` receives the answer's text as it
        is generated (in the batch's thread), batched or not. `cancel(future)` stops a request nobody waits for."""
        if self._closed:
            raise RuntimeError("this MicroBatcher is closed")
        check_ablations(ablations)
        check_groundedness(groundedness)
        if isinstance(request, Prepared):
            if generate_kwargs:
                raise InvalidInputError("a Prepared request already holds its generation settings: pass it alone")
            prepared = request
        else:
            prepared = self.attributor.prepare(
                AttributionRequest.coerce(request), max_new_tokens=max_new_tokens, **generate_kwargs
            )
        if "streamer" in prepared.generate_kwargs:
            raise InvalidInputError("a micro-batched request cannot stream: use Attributor.stream")
        settings = prepared.run_settings() + (ablations,)
        pending = _Pending(prepared, settings, Future(), ablations, groundedness, stop=stop, on_text=on_text)
        with self._guard:
            self._submitted[pending.future] = pending
        self._queue.put(pending)
        return pending.future

    def cancel(self, future: Future) -> bool:
        """Stop a submitted request wherever it is: queued (it never runs), or a row of the running batch (it stops
        decoding at the next step while the others go on, and is not scored). Its Future then raises
        `CancelledError`. False when it had already finished."""
        if future.cancel():
            return True
        with self._guard:
            pending = self._submitted.get(future)
        if pending is None or future.done():
            return False
        pending.halted.set()
        return True

    def generate(
        self,
        request: RequestLike,
        max_new_tokens: int = 256,
        ablations: int = 0,
        groundedness: GroundednessMode = "measured",
        **kw: Any,
    ) -> Attribution:
        """`Attributor.generate` (or `attribute`, for a request with an answer), sharing a batch with whoever
        else is asking."""
        return self.submit(request, max_new_tokens, ablations, groundedness, **kw).result()

    def attribute(
        self, request: RequestLike, ablations: int = 0, groundedness: GroundednessMode = "measured"
    ) -> Attribution:
        parsed = AttributionRequest.coerce(request)
        if parsed.answer is None:
            raise InvalidInputError("attribute needs a request with an answer")
        return self.submit(parsed, ablations=ablations, groundedness=groundedness).result()

    async def agenerate(
        self,
        request: RequestLike,
        max_new_tokens: int = 256,
        ablations: int = 0,
        groundedness: GroundednessMode = "measured",
        **kw: Any,
    ) -> Attribution:
        return await asyncio.wrap_future(self.submit(request, max_new_tokens, ablations, groundedness, **kw))

    async def aattribute(
        self, request: RequestLike, ablations: int = 0, groundedness: GroundednessMode = "measured"
    ) -> Attribution:
        parsed = AttributionRequest.coerce(request)
        if parsed.answer is None:
            raise InvalidInputError("attribute needs a request with an answer")
        return await asyncio.wrap_future(self.submit(parsed, ablations=ablations, groundedness=groundedness))

    def close(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the worker."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._worker.join(timeout)

    def __enter__(self) -> MicroBatcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the worker -----------------------------------------------------------------------------------------
    def _serve(self) -> None:
        held: list[_Pending] = []  # arrived while another settings group was being collected
        stopping = False
        while True:
            if not held:
                if stopping:
                    return
                first = self._queue.get()
                if first is None:
                    return
                held.append(first)
            batch, held = self._take_group(held)
            wait = self.max_wait_ms / 1000
            # The window opens at the request's arrival, or when the last batch ended if it arrived during it:
            # the callers that batch answered are about to send their next requests, and a request queued behind
            # it would otherwise start alone just before they arrive (closed-loop clients would then alternate a
            # batch of 1 with a batch of the rest). A request arriving then also closes the batch as soon as it
            # is as large as those callers plus what queued behind them: a lone caller never waits for itself.
            returning = batch[0].arrived < self._last_batch_end + wait
            deadline = max(batch[0].arrived, self._last_batch_end) + wait
            enough = self._expected if returning else self.max_batch_size
            stopping, reason = self._collect(batch, held, deadline, enough)
            # the batch closes once the model is free: whatever queued behind a busy model (a stream, another
            # batch) joins it instead of waiting for the next turn
            with self.attributor.lock:
                if not stopping:
                    collected = len(batch)
                    stopping, _ = self._collect(batch, held, None, self.max_batch_size)
                    reason = "busy" if len(batch) > collected else reason
                self._run(batch, reason, len(held))

    def _collect(
        self, batch: list[_Pending], held: list[_Pending], deadline: float | None, enough: int
    ) -> tuple[bool, str]:
        """Add arriving requests with the batch's settings until it holds `enough` (or is full), or the queue is
        empty at `deadline` (now when None); others are held for a later batch. Returns (whether `close()` was
        called, why the batch closed: "full", "expected" (it holds `enough`) or "window")."""
        while len(batch) < self.max_batch_size:
            if len(batch) >= enough:
                return False, "expected"
            left = 0.0 if deadline is None else deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                return False, "window"
            if item is None:
                return True, "closed"
            (batch if item.settings == batch[0].settings else held).append(item)
        return False, "full"

    def _take_group(self, held: list[_Pending]) -> tuple[list[_Pending], list[_Pending]]:
        """The oldest request and the held ones sharing its settings (up to the batch size); the rest stay held."""
        settings = held[0].settings
        batch = [p for p in held if p.settings == settings][: self.max_batch_size]
        taken = {id(p) for p in batch}
        return batch, [p for p in held if id(p) not in taken]

    def _record(self, sizes: list[int], reason: str) -> None:
        self.stats.batch_sizes.extend(sizes)
        self.stats.closed_by.extend([reason] * len(sizes))

    def _finish(self, batch: list[_Pending], held: int, outcomes: list[_Outcome]) -> None:
        """Mark the batch's end, then hand each caller its result: a caller that sends its next request at once
        must find the batch already ended (else its request would wait out a fresh window)."""
        self._last_batch_end = time.perf_counter()
        self._expected = min(self.max_batch_size, len(batch) + self._queue.qsize() + held)
        for pending, result, error in outcomes:
            if error is not None:
                pending.future.set_exception(error)
            else:
                pending.future.set_result(result)
        with self._guard:
            for pending in batch:
                self._submitted.pop(pending.future, None)

    def _run(self, batch: list[_Pending], reason: str, held: int) -> None:
        running = [p for p in batch if p.future.set_running_or_notify_cancel()]
        # stopped or cancelled while queued: it never runs
        gone: list[_Outcome] = [(p, None, CancelledError("stopped before it ran")) for p in running if p.stopping()]
        live = [p for p in running if not p.stopping()]
        items = [BatchItem(p.prepared, p.ablations, p.groundedness, hooks=p.hooks(), wanted=p.wanted) for p in live]
        outcomes, attempts = run_batch(self.attributor, items)
        # a batch that failed is not one the model finished: its requests' single runs are what ran
        self._record([a.size for a in attempts if a.ok or a.size == 1], reason)
        self._finish(
            batch,
            held,
            gone + [(p, None, o) if isinstance(o, BaseException) else (p, o, None) for p, o in zip(live, outcomes)],
        )
