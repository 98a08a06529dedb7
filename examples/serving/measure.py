"""Time N concurrent requests against the Ray Serve deployment, batched and not (max_batch_size=1), on a local
single-node Ray. The numbers in docs/serving.md come from here.

    HF_HUB_OFFLINE=1 .venv/bin/python -m examples.serving.measure --requests 6 --max-new-tokens 16
"""

import argparse
import json
import logging
import os
import time
from typing import Any

import ray
from ray import serve

from examples.serving.ray_app import ServiceConfig, build_app

logger = logging.getLogger(__name__)

DOCS = [
    "The Eiffel Tower opened in 1889 in Paris.",
    "Berlin is the capital of Germany.",
    "Bees communicate by dancing to show where flowers are.",
    "Honey is made from nectar and stored in wax cells.",
]
QUERIES = [
    "When did the Eiffel Tower open?", "What is the capital of Germany?", "How do bees find flowers?",
    "What is honey made of?", "Where is the Eiffel Tower?", "Where is honey stored?", "Which city is the capital?",
    "What do bees do to communicate?",
]


def run_round(handle: Any, n: int, max_new_tokens: int) -> float:
    started = time.perf_counter()
    responses = [handle.attribute.remote({"query": QUERIES[i % len(QUERIES)], "documents": DOCS,
                                          "max_new_tokens": max_new_tokens}) for i in range(n)]
    for r in responses:
        r.result(timeout_s=600)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    report: dict[str, Any] = {"requests": args.requests, "max_new_tokens": args.max_new_tokens,
                              "replicas": args.replicas, "torch_threads": args.torch_threads}
    try:
        serve.start(proxy_location="Disabled")  # the handle only: no HTTP port
        for label, batch in (("batched", args.requests), ("one_by_one", 1)):
            config = ServiceConfig(replicas=args.replicas, cpus_per_replica=args.num_cpus / args.replicas,
                                   torch_threads=args.torch_threads, max_batch_size=batch, batch_wait_timeout_s=0.2,
                                   max_ongoing_requests=max(2 * args.requests, 2))
            started = time.perf_counter()
            handle = serve.run(build_app(config), name="at2-rag-measure", route_prefix=None)
            report[f"{label}_deploy_s"] = round(time.perf_counter() - started, 1)
            run_round(handle, 1, args.max_new_tokens)  # warm-up
            report[f"{label}_round_s"] = round(run_round(handle, args.requests, args.max_new_tokens), 2)
            if args.replicas == 1:  # with more, `stats` answers from whichever replica the handle picks
                batches = handle.stats.remote().result()["model_batches"][1:]  # without the warm-up
                report[f"{label}_batch_sizes"] = [b["size"] for b in batches]
                report[f"{label}_model_s"] = round(sum(b["seconds"] for b in batches), 2)
            serve.delete("at2-rag-measure")
    finally:
        serve.shutdown()
        ray.shutdown()
    logger.info("%s", json.dumps(report))


if __name__ == "__main__":
    main()
