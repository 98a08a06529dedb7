"""The chatbot's answers under several clients, with the real model on a real server (issue 36 point 5): Stop and a
client that leaves end an answer wherever it is (waiting in the micro-batcher, or one row of a running batch while
the others go on), and answers that wait for the model stream token by token like the first one."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # the example is the package `chatbot` inside examples/

from chatbot.app import SAMPLE_DOCS, create_app, load_default_attributor  # noqa: E402
from chatbot.streaming import model_busy  # noqa: E402
from chatbot_server import ServerThread  # noqa: E402

pytestmark = pytest.mark.slow

FIRST = "How many vacation days do I get per year?"
WAITING = ["How do I get reimbursed for expenses?", "Can I work remotely?"]
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def attributor():
    return load_default_attributor()


@pytest.fixture()
def server(attributor):
    with ServerThread(create_app(SAMPLE_DOCS, attributor=attributor, max_new_tokens=NEW_TOKENS)) as s:
        yield s


def sse_events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    kind = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: ") and kind is not None:
            yield kind, json.loads(line[len("data: ") :])


class Client(threading.Thread):
    """One browser: asks a question, records every event with its arrival time; `leave_after_tokens` closes the
    connection after that many token events."""

    def __init__(self, origin: str, question: str, leave_after_tokens: int | None = None) -> None:
        super().__init__(daemon=True)
        self.origin, self.question, self.leave_after_tokens = origin, question, leave_after_tokens
        self.events: list[tuple[str, dict[str, Any], float]] = []
        self.left_at: float | None = None
        self.started = time.monotonic()

    def run(self) -> None:
        body = {"question": self.question, "history": []}
        with httpx.Client(timeout=600) as http, http.stream("POST", f"{self.origin}/api/chat", json=body) as res:
            tokens = 0
            for kind, data in sse_events(res):
                self.events.append((kind, data, time.monotonic()))
                tokens += kind == "token"
                if self.leave_after_tokens is not None and tokens >= self.leave_after_tokens:
                    self.left_at = time.monotonic()
                    return  # closing the stream drops the connection

    def first(self, kind: str) -> dict[str, Any] | None:
        return next((data for k, data, _ in self.events if k == kind), None)

    def wait_for(self, kind: str, count: int = 1, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while sum(k == kind for k, _, _ in self.events) < count:
            assert time.monotonic() < deadline and (self.is_alive() or self.events), f"no {kind} event"
            time.sleep(0.02)

    def text(self) -> str:
        return "".join(data["text"] for k, data, _ in self.events if k == "token")


def stop(origin: str, client: Client) -> None:
    retrieval = client.first("retrieval")
    assert retrieval is not None
    res = httpx.post(f"{origin}/api/chat/stop", json={"stream_id": retrieval["stream_id"]}, timeout=30)
    assert res.status_code == 200


def test_stop_ends_a_waiting_answer_before_it_runs(server):
    """Stop pressed while the answer waits for the model: it never runs, and the page is told it stopped (before,
    the stop answered 200 and the full answer came anyway)."""
    first = Client(server.origin, FIRST)
    first.start()
    first.wait_for("token")
    waiting = Client(server.origin, WAITING[0])
    waiting.start()
    waiting.wait_for("status")  # it waits in the micro-batcher
    stop(server.origin, waiting)
    waiting.join(timeout=600)
    first.join(timeout=600)
    kinds = [k for k, _, _ in waiting.events]
    assert "attribution" not in kinds and "token" not in kinds
    assert waiting.first("error") == {"error": "stopped", "message": "You stopped the answer before it was generated."}
    assert first.first("attribution") is not None


def test_waiting_answers_stream_and_stop_ends_one_row_of_their_batch(server, attributor):
    """Two questions that waited share one batch: both stream token by token (the first token long before the
    last), Stop ends one row (its shorter answer attributed, marked stopped) and the other finishes exactly as it
    would alone."""
    from at2_rag import get_micro_batcher

    batcher = get_micro_batcher(attributor)
    before = len(batcher.stats.batch_sizes)
    first = Client(server.origin, FIRST)
    first.start()
    first.wait_for("token")
    waiting = [Client(server.origin, q) for q in WAITING]
    for client in waiting:
        client.start()
    for client in waiting:
        client.wait_for("status")
    kept, stopped = waiting
    stopped.wait_for("token", 3)
    stop(server.origin, stopped)
    for client in (first, *waiting):
        client.join(timeout=600)
    assert batcher.stats.batch_sizes[before:] == [2]
    for client in waiting:
        tokens = [t for k, _, t in client.events if k == "token"]
        attribution = client.first("attribution")
        assert attribution is not None and attribution["batched"] is True
        assert len(tokens) > 3 and tokens[0] < client.events[-1][2] - 0.5  # streamed, not handed over at the end
        assert client.text() == attribution["answer"]
    kept_attribution, stopped_attribution = kept.first("attribution"), stopped.first("attribution")
    assert kept_attribution is not None and stopped_attribution is not None
    assert kept_attribution["stopped"] is False and stopped_attribution["stopped"] is True
    assert stopped_attribution["finish_reason"] == "stopped"
    service = server.app.state.service
    alone = [attributor.generate(q, service.retrieve(q, []), max_new_tokens=NEW_TOKENS) for q in WAITING]
    assert kept_attribution["answer"] == alone[0].answer
    assert alone[1].answer.startswith(stopped_attribution["answer"])
    assert len(stopped_attribution["answer"]) < len(alone[1].answer)


@pytest.mark.parametrize("batched", [False, True])
def test_a_client_that_leaves_frees_the_model_within_a_second(server, attributor, batched):
    """A client that closes its connection mid-answer (streaming alone, or a batched answer after it waited) stops
    its generation: the model is free again within a second."""
    first = None
    if batched:
        first = Client(server.origin, FIRST)
        first.start()
        first.wait_for("token")
    leaving = Client(server.origin, WAITING[0], leave_after_tokens=3)
    leaving.start()
    if first is not None:
        first.join(timeout=600)
    leaving.join(timeout=600)
    assert leaving.left_at is not None
    while model_busy(attributor) and time.monotonic() < leaving.left_at + 10:
        time.sleep(0.01)
    freed = time.monotonic() - leaving.left_at
    assert not model_busy(attributor)
    assert freed < 1.0, f"the model was busy {freed:.2f} s after the client left"
    if batched:
        assert any(k == "status" for k, _, _ in leaving.events)  # it really waited and ran batched


def test_sixteen_clients_at_once_each_get_their_own_answer(attributor):
    """16 clients ask at the same instant: one answer streams alone, the others batch; every client gets its own
    question's answer and documents, streamed token by token, no request fails, and the status probe answers
    throughout."""
    questions = [f"{q} (client {i})" for i, q in enumerate([FIRST, *WAITING, "Who approves a business trip?"] * 4)]
    with ServerThread(create_app(SAMPLE_DOCS, attributor=attributor, max_new_tokens=12)) as server:
        service = server.app.state.service
        clients = [Client(server.origin, q) for q in questions]
        probes: list[int] = []
        for client in clients:
            client.start()
        while any(c.is_alive() for c in clients):
            probes.append(httpx.get(f"{server.origin}/api/status", timeout=30).status_code)
            time.sleep(0.5)
        for client, question in zip(clients, questions):
            kinds = [k for k, _, _ in client.events]
            assert "error" not in kinds and kinds[-2:] == ["attribution", "done"], (question, kinds)
            attribution = client.first("attribution")
            retrieval = client.first("retrieval")
            assert attribution is not None and retrieval is not None
            assert attribution["query"] == question and client.text() == attribution["answer"]
            expected = [d.id for d in service.retrieve(question, [])]
            assert [d["id"] for d in retrieval["documents"]] == expected
            assert [d["id"] for d in attribution["documents"]] == expected
            assert "token" in kinds
        batched = [bool((c.first("attribution") or {}).get("batched")) for c in clients]
        assert sum(batched) == len(clients) - 1  # one streamed alone, the rest waited and batched
    assert probes and set(probes) == {200}
