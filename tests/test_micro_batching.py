"""MicroBatcher: concurrent callers share a batch, each gets exactly its own result or its own error."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest
from test_batching import REQUESTS, SCORE_TOL, _scores

from at2_rag import InvalidInputError, MicroBatcher

NEW = 12


@pytest.fixture(scope="module")
def alone(att):
    return [att.generate(r, max_new_tokens=NEW) for r in REQUESTS]


def _concurrently(fn, items):
    results: list = [None] * len(items)
    barrier = threading.Barrier(len(items))

    def call(i):
        barrier.wait()
        try:
            results[i] = fn(items[i])
        except Exception as exc:  # noqa: BLE001 - compared below
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_callers_share_one_batch_and_get_their_own_results(att, alone):
    with MicroBatcher(att, max_batch_size=8, max_wait_ms=500) as batcher:
        results = _concurrently(lambda r: batcher.generate(r, max_new_tokens=NEW), REQUESTS)
        sizes = list(batcher.stats.batch_sizes)
    assert max(sizes) > 1 and sum(sizes) == len(REQUESTS)
    for got, expected in zip(results, alone):
        assert got.answer == expected.answer
        assert (_scores(got) - _scores(expected)).abs().max().item() <= SCORE_TOL


def test_a_bad_request_fails_alone(att, alone):
    too_long = {"query": "Why? " * 5000, "documents": ["x"]}  # refused in its caller's thread, at once
    with MicroBatcher(att, max_wait_ms=500) as batcher:
        results = _concurrently(lambda r: batcher.generate(r, max_new_tokens=NEW), [REQUESTS[0], too_long, REQUESTS[2]])
    assert "context window" in str(results[1])
    assert results[0].answer == alone[0].answer and results[2].answer == alone[2].answer


def test_batch_size_and_settings_split_batches(att):
    with MicroBatcher(att, max_batch_size=2, max_wait_ms=500) as batcher:
        futures = [batcher.submit(r, max_new_tokens=NEW) for r in REQUESTS[:3]]
        other = batcher.submit(REQUESTS[3], max_new_tokens=NEW + 1)  # other settings: never in their batch
        answered = {"answer": "It opened in 1889.", **REQUESTS[0]}
        forward = batcher.submit(answered)  # an answer from elsewhere: attributed, not generated
        results = [f.result() for f in futures] + [other.result(), forward.result()]
    assert all(size <= 2 for size in batcher.stats.batch_sizes)
    assert results[-1].answer == "It opened in 1889." and results[-1].num_answer_tokens > 0
    assert results[-2].num_answer_tokens <= NEW + 1


def test_async_callers_do_not_block_the_event_loop(att, alone):
    async def main():
        ticks = []

        async def ticker():
            while True:
                ticks.append(time.perf_counter())
                await asyncio.sleep(0.01)

        tick_task = asyncio.create_task(ticker())
        with MicroBatcher(att, max_wait_ms=200) as batcher:
            results = await asyncio.gather(*(batcher.agenerate(r, max_new_tokens=NEW) for r in REQUESTS[:2]))
            sizes = list(batcher.stats.batch_sizes)
        tick_task.cancel()
        gaps = [b - a for a, b in zip(ticks, ticks[1:])]
        return results, sizes, max(gaps)

    results, sizes, worst_gap = asyncio.run(main())
    assert sizes == [2]
    assert [r.answer for r in results] == [a.answer for a in alone[:2]]
    assert worst_gap < 0.5, worst_gap  # the ticker kept running while the model worked in the batcher's thread


def test_bad_settings_are_clear(att):
    with pytest.raises(InvalidInputError, match="max_batch_size"):
        MicroBatcher(att, max_batch_size=0)
    with MicroBatcher(att) as batcher:
        with pytest.raises(InvalidInputError, match="max_new_tokens"):
            batcher.submit(REQUESTS[0], max_new_tokens=0)
        with pytest.raises(InvalidInputError, match="stream"):
            batcher.submit(REQUESTS[0], streamer=object())
        with pytest.raises(InvalidInputError, match="documents"):
            batcher.submit({"query": "q"})
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(REQUESTS[0])


def test_a_batch_that_fails_in_the_model_hands_each_caller_its_own_error(att):
    """A failure inside the batched run is retried request by request: each caller gets its own error (here
    every one, since the setting is bad for all), and the batcher keeps serving."""
    with MicroBatcher(att, max_wait_ms=300) as batcher:
        futures = [batcher.submit(r, max_new_tokens=4, do_sample=True, temperature=-1.0) for r in REQUESTS[:2]]
        errors = [f.exception(timeout=300) for f in futures]
        after = batcher.generate(REQUESTS[0], max_new_tokens=4)
    assert all(isinstance(e, ValueError) and "temperature" in str(e) for e in errors), errors
    assert batcher.stats.batch_sizes[:2] == [1, 1] and after.num_answer_tokens > 0


def test_requests_queued_behind_a_busy_model_share_the_next_batch(att, alone):
    """While the model is busy (here: a caller holds its lock, as a stream does), arriving requests wait in the
    batcher and then run as one batch, whatever the wait window."""
    with MicroBatcher(att, max_batch_size=8, max_wait_ms=1) as batcher:
        with att.lock:
            futures = []
            for r in REQUESTS[:3]:
                futures.append(batcher.submit(r, max_new_tokens=NEW))
                time.sleep(0.05)  # far longer than the window
        results = [f.result() for f in futures]
        sizes = list(batcher.stats.batch_sizes)
    assert sizes[-1] >= 2 and sum(sizes) == 3, sizes
    assert batcher.stats.closed_by[-1] == "busy", batcher.stats.closed_by
    assert [r.answer for r in results] == [a.answer for a in alone[:3]]


def test_a_request_queued_during_a_batch_waits_for_that_batchs_callers(att, alone):
    """Closed-loop callers send their next request right after their answer: a request that queued while the
    model was busy waits one window after the batch ends, so it shares a batch with them instead of running
    alone just before they arrive (which would alternate a batch of 1 with a batch of the rest forever)."""
    with MicroBatcher(att, max_batch_size=8, max_wait_ms=400) as batcher:
        first = batcher.submit(REQUESTS[0], max_new_tokens=NEW)
        while not first.running():
            time.sleep(0.005)
        queued = batcher.submit(REQUESTS[1], max_new_tokens=NEW)  # arrives while the first batch runs
        assert not first.done(), "the first batch ended before the second request queued: the test is void"
        first.result(timeout=300)
        time.sleep(0.05)  # the first caller's next request, well inside the window
        follow_up = batcher.submit(REQUESTS[2], max_new_tokens=NEW)
        results = [queued.result(timeout=300), follow_up.result(timeout=300)]
        sizes = list(batcher.stats.batch_sizes)
    assert sizes == [1, 2], sizes
    assert batcher.stats.closed_by == ["window", "expected"], batcher.stats.closed_by
    assert [r.answer for r in results] == [a.answer for a in alone[1:3]]


def test_a_lone_caller_does_not_wait_for_itself(att, alone):
    """A request sent right after its caller's previous answer, with nothing queued, closes its batch at once
    ("expected": the last batch's callers are all back) instead of waiting out the window; the window applies
    to the first request and again after a quiet spell."""
    with MicroBatcher(att, max_batch_size=8, max_wait_ms=1500) as batcher:
        answers = [batcher.generate(r, max_new_tokens=NEW).answer for r in REQUESTS[:3]]
        reasons = list(batcher.stats.closed_by)
    assert reasons == ["window", "expected", "expected"], reasons
    assert answers == [a.answer for a in alone[:3]]


# ---- stop, cancel and stream a row of a batch (issue 36 point 5) ----------------------------------------------

LONG = 60
DOCS = ["The Eiffel Tower is in Paris. It was completed in 1889.", "Mount Fuji is the highest mountain in Japan."]
DESCRIBE = ["Describe the Eiffel Tower in detail.", "Describe Mount Fuji in detail."]


@pytest.fixture(scope="module")
def described(att):
    return [att.generate(q, DOCS, max_new_tokens=LONG) for q in DESCRIBE]


def _wait_for(texts: list[str], chars: int, deadline_s: float = 300) -> None:
    deadline = time.monotonic() + deadline_s
    while len("".join(texts)) < chars:
        assert time.monotonic() < deadline, "no text streamed"
        time.sleep(0.02)


def test_a_row_of_a_running_batch_stops_alone_and_streams_its_text(att, described):
    """Stop ends one row of the running batch where it is (scored, `finish_reason="stopped"`) while the other row
    finishes exactly as it would alone; each row's streamed text joins to its answer."""
    with MicroBatcher(att, max_batch_size=4, max_wait_ms=300) as batcher:
        texts: list[list[str]] = [[], []]
        stop = threading.Event()
        first = batcher.submit({"query": DESCRIBE[0], "documents": DOCS}, LONG, on_text=texts[0].append)
        second = batcher.submit({"query": DESCRIBE[1], "documents": DOCS}, LONG, on_text=texts[1].append, stop=stop)
        _wait_for(texts[1], 20)
        stop.set()
        kept, stopped = first.result(timeout=600), second.result(timeout=600)
        assert batcher.stats.batch_sizes == [2]
    assert kept.answer == described[0].answer and "".join(texts[0]) == kept.answer
    _assert_close(kept, described[0])
    assert stopped.finish_reason == "stopped" and stopped.num_answer_tokens < described[1].num_answer_tokens
    assert described[1].answer.startswith(stopped.answer) and "".join(texts[1]) == stopped.answer
    assert stopped.citations  # the shorter answer is attributed


def test_cancel_frees_a_running_row_and_a_queued_request_never_runs(att, described):
    with MicroBatcher(att, max_batch_size=4, max_wait_ms=300) as batcher:
        texts: list[list[str]] = [[], []]
        kept = batcher.submit({"query": DESCRIBE[0], "documents": DOCS}, LONG, on_text=texts[0].append)
        gone = batcher.submit({"query": DESCRIBE[1], "documents": DOCS}, LONG, on_text=texts[1].append)
        _wait_for(texts[1], 10)
        assert batcher.cancel(gone)
        with pytest.raises(concurrent.futures.CancelledError):
            gone.result(timeout=600)
        assert kept.result(timeout=600).answer == described[0].answer
        assert len("".join(texts[1])) < len(described[1].answer)  # it stopped decoding
        assert not batcher.cancel(kept)  # finished: nothing to cancel

        with att.lock:  # the model is busy: the next requests queue
            queued = batcher.submit({"query": DESCRIBE[0], "documents": DOCS}, LONG)
            stopped_early = threading.Event()
            waiting = batcher.submit({"query": DESCRIBE[1], "documents": DOCS}, LONG, stop=stopped_early)
            assert batcher.cancel(queued)
            stopped_early.set()
        with pytest.raises(concurrent.futures.CancelledError):
            queued.result(timeout=600)
        with pytest.raises(concurrent.futures.CancelledError):
            waiting.result(timeout=600)


def _assert_close(got, want) -> None:
    assert got.answer == want.answer
    assert got.document_scores() == pytest.approx(want.document_scores(), abs=SCORE_TOL)
