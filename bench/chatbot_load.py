"""The chatbot under load: N clients ask at the same instant, on a real server (uvicorn on 127.0.0.1) with the
real model; latency and time to first token per client, at 1, 4, 8 and 16 clients.

One answer streams while the model is free; the questions that arrive meanwhile wait in the core's micro-batcher
and are answered in batches, each row streaming its tokens as the batch generates. Every answer is checked to be
its own (its attribution's question is the one its client asked) and no request may fail. Prints p50/p95 of the
time to first token and of the whole answer per level, the model's batch sizes, and writes JSON.

    python bench/chatbot_load.py [--clients 1 4 8 16] [--max-new-tokens 64] [--out docs/bench]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))

from chatbot.app import SAMPLE_DOCS, create_app, load_default_attributor  # noqa: E402
from chatbot_server import ServerThread  # noqa: E402

from at2_rag import get_micro_batcher  # noqa: E402

QUESTIONS = [
    "How many vacation days do I get per year?",
    "How do I get reimbursed for expenses?",
    "Can I work remotely?",
    "Can unused vacation days be carried over?",
    "Who approves a business trip?",
    "How long does an expense report take to be paid?",
    "Is there a limit on remote work days per week?",
    "What happens to vacation days when I leave the company?",
]


def ask(origin: str, question: str, barrier: threading.Barrier, out: dict[str, Any]) -> None:
    barrier.wait()
    start = time.perf_counter()
    first_token = None
    attribution = None
    error = None
    try:
        body = {"question": question, "history": []}
        with httpx.Client(timeout=1800) as http, http.stream("POST", f"{origin}/api/chat", json=body) as res:
            kind = None
            for line in res.iter_lines():
                if line.startswith("event: "):
                    kind = line[len("event: ") :]
                elif line.startswith("data: "):
                    if kind == "token" and first_token is None:
                        first_token = time.perf_counter() - start
                    elif kind == "attribution":
                        attribution = json.loads(line[len("data: ") :])
                    elif kind == "error":
                        error = json.loads(line[len("data: ") :])
    except Exception as exc:  # noqa: BLE001 - counted, not fatal
        error = {"error": type(exc).__name__, "message": str(exc)}
    out.update(
        question=question,
        first_token_s=first_token,
        total_s=time.perf_counter() - start,
        error=error,
        own_answer=attribution is not None and attribution.get("query") == question,
        batched=bool(attribution and attribution.get("batched")),
        answer_tokens=attribution.get("num_answer_tokens") if attribution else None,
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def level(origin: str, clients: int, batcher: Any) -> dict[str, Any]:
    barrier = threading.Barrier(clients)
    results: list[dict[str, Any]] = [{} for _ in range(clients)]
    before = len(batcher.stats.batch_sizes)
    threads = [
        threading.Thread(target=ask, args=(origin, QUESTIONS[i % len(QUESTIONS)], barrier, results[i]))
        for i in range(clients)
    ]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ttft = [r["first_token_s"] for r in results if r["first_token_s"] is not None]
    total = [r["total_s"] for r in results]
    row = {
        "clients": clients,
        "errors": sum(r["error"] is not None for r in results),
        "mixed": sum(not r["own_answer"] for r in results if r["error"] is None),
        "batched_answers": sum(r["batched"] for r in results),
        "model_batches": batcher.stats.batch_sizes[before:],
        "ttft_p50_s": statistics.median(ttft) if ttft else None,
        "ttft_p95_s": percentile(ttft, 0.95) if ttft else None,
        "total_p50_s": statistics.median(total),
        "total_p95_s": percentile(total, 0.95),
        "wall_s": wall,
        "answer_tokens": sum(r["answer_tokens"] or 0 for r in results),
        "clients_detail": results,
    }
    print(
        f"{clients:>3} clients: TTFT p50 {row['ttft_p50_s']:.2f} s p95 {row['ttft_p95_s']:.2f} s | "
        f"answer p50 {row['total_p50_s']:.2f} s p95 {row['total_p95_s']:.2f} s | batches {row['model_batches']} | "
        f"errors {row['errors']} mixed {row['mixed']}",
        flush=True,
    )
    return row


def plot(report: dict[str, Any], path: Path) -> None:
    """Time to first token and to the whole answer (p50 and p95) against the number of clients."""
    from at2_rag.plotting import pyplot, save_figure

    plt = pyplot()
    levels = report["levels"]
    clients = [row["clients"] for row in levels]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, label, color in (("ttft", "first token", "#1f77b4"), ("total", "whole answer", "#d62728")):
        ax.plot(clients, [row[f"{key}_p50_s"] for row in levels], "o-", color=color, label=f"{label}, p50")
        ax.plot(clients, [row[f"{key}_p95_s"] for row in levels], "s--", color=color, label=f"{label}, p95")
    ax.set_xlabel("clients asking at the same instant")
    ax.set_ylabel("seconds")
    ax.set_xticks(clients)
    ax.set_title(f"chatbot under load ({report['max_new_tokens']} new tokens, {report['machine']})", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the JSON in --out")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads((args.out / "chatbot_load.json").read_text()), args.out / "chatbot_load.png")
        return
    attributor = load_default_attributor()
    app = create_app(SAMPLE_DOCS, attributor=attributor, max_new_tokens=args.max_new_tokens)
    batcher = get_micro_batcher(attributor)
    rows = []
    with ServerThread(app) as server:
        level(server.origin, 1, batcher)  # warm-up: first-use costs out of the numbers
        for clients in args.clients:
            rows.append(level(server.origin, clients, batcher))
    report = {
        "bench": "chatbot_load",
        "max_new_tokens": args.max_new_tokens,
        "max_batch_size": batcher.max_batch_size,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "levels": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "chatbot_load.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out / "chatbot_load.png")
    print(f"wrote {path} and chatbot_load.png")


if __name__ == "__main__":
    main()
