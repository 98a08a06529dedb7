"""The Ray Serve deployment (examples/serving/ray_app.py) on a local single-node Ray: concurrent requests over
the DeploymentHandle and over HTTP to 127.0.0.1 share a batch, each result equals what the same model returns
in this process, and a bad request gets its own clear error while the others succeed."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed: install the serve extra (pip install -e '.[serve]')")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install -e '.[serve]')")

from at2_rag import AttributionRequest, ContextTooLongError, InvalidInputError  # noqa: E402
from examples.serving.ray_app import Job, ServiceConfig, build_app, parse_job, run_jobs  # noqa: E402

pytestmark = pytest.mark.slow

SCORE_TOL = 1e-4
MAX_NEW_TOKENS = 16
DOCS_A = ["The Eiffel Tower opened in 1889 in Paris.", "Berlin is the capital of Germany."]
DOCS_B = [
    "Bees communicate by dancing to show where flowers are.",
    "Honey is made from nectar and stored in wax cells.",
]
HISTORY = [{"role": "user", "content": "What is a colony?"}, {"role": "assistant", "content": "A bee family."}]
GENERATE = [  # the first three over the handle, the last over HTTP
    {"query": "When did the Eiffel Tower open?", "documents": DOCS_A},
    {"query": "What is honey made of?", "documents": DOCS_B},
    {"query": "And how do they find flowers?", "documents": DOCS_B, "history": HISTORY},
    {"query": "What is the capital of Germany?", "documents": DOCS_A, "system_prompt": None},
]
ATTRIBUTE = {"query": "Where is the Eiffel Tower?", "documents": DOCS_A, "answer": "It is in Paris."}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/attribute", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _assert_close(served: Any, local: Any, where: str = "result") -> None:
    """The same JSON, floats within SCORE_TOL (batched and single runs differ only by float rounding)."""
    if isinstance(local, float) or isinstance(served, float):
        assert abs(served - local) <= SCORE_TOL, f"{where}: {served} != {local}"
    elif isinstance(local, dict):
        assert isinstance(served, dict) and served.keys() == local.keys(), f"{where}: keys differ"
        for k in local:
            _assert_close(served[k], local[k], f"{where}.{k}")
    elif isinstance(local, list):
        assert isinstance(served, list) and len(served) == len(local), f"{where}: lengths differ"
        for i, (s, l_) in enumerate(zip(served, local)):
            _assert_close(s, l_, f"{where}[{i}]")
    else:
        assert served == local, f"{where}: {served!r} != {local!r}"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The replica, Ray's own processes and this process share the cores: one torch thread here (two threads on
    two busy shared cores ran the local comparison ~6x slower), restored afterwards for the other modules."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def local(att):
    """What the model in this process returns for the same requests: the generate ones in one batch (equal to
    each alone: tests/test_batching.py), the attribute one alone."""
    return (
        [r.to_dict() for r in att.generate_batch(GENERATE, max_new_tokens=MAX_NEW_TOKENS)],
        att.attribute(AttributionRequest(**ATTRIBUTE)).to_dict(),
    )


@pytest.fixture(scope="module")
def service():
    """Ray on this machine only (`address="local"` never joins an existing cluster), the app with 1 replica."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2,
             log_to_driver=False)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServiceConfig(replicas=1, cpus_per_replica=1, torch_threads=1, max_batch_size=len(GENERATE) + 1,
                               batch_wait_timeout_s=2.0, default_max_new_tokens=MAX_NEW_TOKENS)
        handle = serve.run(build_app(config), name="at2-rag-test", route_prefix="/")
        yield handle, port, time.perf_counter() - started
    finally:
        serve.shutdown()
        ray.shutdown()


def test_concurrent_requests_share_a_batch_and_equal_the_local_model(local, service):
    handle, port, startup_s = service
    http_result: dict[str, Any] = {}

    def over_http() -> None:
        http_result["good"] = _post(port, json.dumps(GENERATE[3]).encode())

    def bad_over_http() -> None:
        http_result["bad"] = _post(port, json.dumps({"query": "q", "documents": "not a list"}).encode())
        http_result["not_json"] = _post(port, b"{nope")

    started = time.perf_counter()
    threads = [threading.Thread(target=over_http), threading.Thread(target=bad_over_http)]
    for t in threads:
        t.start()
    responses = [handle.attribute.remote(r) for r in GENERATE[:3]]
    attributed = handle.attribute.remote(ATTRIBUTE)
    bad = handle.attribute.remote({"query": "q", "documents": DOCS_A, "max_new_tokens": 0})
    served = [r.result(timeout_s=300) for r in responses]
    served_attribute = attributed.result(timeout_s=300)
    with pytest.raises(InvalidInputError, match="max_new_tokens must be a positive integer"):
        bad.result(timeout_s=300)
    for t in threads:
        t.join(300)
    round_s = time.perf_counter() - started

    status, body = http_result["good"]
    assert status == 200, body
    served.append(body)
    status, body = http_result["bad"]
    assert status == 422 and body["error"]["type"] == "InvalidInputError", body
    assert body["error"]["message"].startswith("documents:") and "must be a list" in body["error"]["message"], body
    status, body = http_result["not_json"]
    assert status == 400 and "not JSON" in body["error"]["message"], body

    stats = handle.stats.remote().result(timeout_s=60)
    generate_batches = [b["size"] for b in stats["model_batches"] if b["kind"] == "generate"]
    assert max(stats["serve_batch_sizes"]) > 1, stats
    assert max(generate_batches) > 1, stats  # several generate requests ran in one generate_batch
    assert sum(generate_batches) == len(GENERATE) and [b["size"] for b in stats["model_batches"]
                                                       if b["kind"] == "attribute"] == [1], stats

    local_generated, local_attributed = local
    for s, l_ in zip(served, local_generated):
        assert s["schema"] == "at2-rag/attribution" and s["answer"] and s["documents"]
        _assert_close(s, l_)
    _assert_close(served_attribute, local_attributed)
    print(f"\nray serve: startup {startup_s:.1f} s, concurrent round {round_s:.1f} s, batches {stats['model_batches']}")


def test_a_failing_batch_is_retried_one_by_one(att, local):
    """What `@serve.batch` runs, on the model in this process: a request that slips past validation and makes
    its model batch raise fails alone; the others in the batch get their own (correct) results."""
    config = ServiceConfig(default_max_new_tokens=MAX_NEW_TOKENS)
    too_long = {"query": "Summarize.", "documents": ["lorem ipsum dolor " * 4000]}
    with pytest.raises(ContextTooLongError):  # validation catches it before it would join a batch ...
        parse_job(too_long, att, config)
    good = [parse_job(r, att, config) for r in GENERATE[:2]]
    jobs = [good[0], Job(AttributionRequest(**too_long), MAX_NEW_TOKENS), good[1]]  # ... unless it slipped past
    outcomes, batches = run_jobs(att, jobs)
    assert isinstance(outcomes[1], ContextTooLongError)
    assert [(b.kind, b.size, b.retry) for b in batches] == [("generate", 1, True), ("generate", 1, True)]
    assert "context window" in str(outcomes[1])
    for outcome, expected in zip([outcomes[0], outcomes[2]], local[0][:2]):  # run alone after the retry
        _assert_close(outcome.to_dict(), expected)
