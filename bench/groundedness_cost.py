"""Cost of measured groundedness: each call with `groundedness="measured"` vs the same call with "off".

Same prompt, same greedy answer: `generate` (--new-tokens new tokens) and `attribute` (that answer given), at
~500, ~2k and ~6k prompt tokens, single-turn and in a conversation (an earlier exchange before the question, so the
earlier-turns-free pass runs too). Both variants alternate in one process on one model instance (median of --reps
runs after a warm-up, the first variant swapped every run). Also times the measured passes alone. Prints ratios;
writes JSON and a plot.

    python bench/groundedness_cost.py [--sizes 500 2000 6000] [--new-tokens 64] [--reps 5] [--out docs/bench]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from _common import conversation_history, documents_for  # bench/_common.py: overhead.py's passages and history

from at2_rag import Attributor, load_default_model


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(att: Attributor, size: int, conversation: bool, new_tokens: int, reps: int) -> dict:
    query, docs = documents_for(att.tokenizer, size)
    history = conversation_history() if conversation else None
    request = {"query": query, "documents": docs, "history": history}
    off = att.generate(request, max_new_tokens=new_tokens, groundedness="off")
    measured = att.generate(request, max_new_tokens=new_tokens)  # warm-up of both paths
    assert off.answer == measured.answer, "the groundedness mode changed the answer"
    answered = dict(request, answer=off.answer)
    att.attribute(answered, groundedness="off")
    att.attribute(answered)
    times: dict[str, list[float]] = {k: [] for k in ("generate_off", "generate_measured", "attribute_off",
                                                     "attribute_measured", "passes_alone")}
    run = att.run(att.prepare(answered))  # one forward pass over the given answer
    for rep in range(reps):
        order = ("off", "measured") if rep % 2 == 0 else ("measured", "off")
        for mode in order:
            times[f"generate_{mode}"].append(
                timed(lambda m=mode: att.generate(request, max_new_tokens=new_tokens, groundedness=m))
            )
        for mode in order:
            times[f"attribute_{mode}"].append(timed(lambda m=mode: att.attribute(answered, groundedness=m)))
        times["passes_alone"].append(timed(lambda: att.measure_groundedness(run)))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "prompt_tokens": measured.num_prompt_tokens,
        "document_tokens": sum(d.num_tokens for d in measured.documents),
        "answer_tokens": measured.num_answer_tokens,
        "conversation": conversation,
        "extra_forward_passes": measured.extra_forward_passes,
        "seconds_median": med,
        "seconds": times,
        "generate_ratio": med["generate_measured"] / med["generate_off"],
        "attribute_ratio": med["attribute_measured"] / med["attribute_off"],
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for conversation, style in ((False, "-"), (True, "--")):
        picked = [r for r in rows if r["conversation"] == conversation]
        label = "conversation" if conversation else "single-turn"
        for key, marker in (("generate_ratio", "o"), ("attribute_ratio", "s")):
            ax.plot([r["prompt_tokens"] for r in picked], [r[key] for r in picked], style, marker=marker,
                    label=f"{key.split('_')[0]}, {label}")
    ax.axhline(1.10, color="grey", lw=0.8, ls=":", label="target for generate (1.10)")
    ax.set_xscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel('time, measured / "off"')
    ax.set_title("Cost of measured groundedness (SmolLM2-135M, CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 6000])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--kinds", nargs="+", choices=["single-turn", "conversation"],
                        default=["single-turn", "conversation"])
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_default_model()
    att = Attributor(model, tokenizer)
    rows: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for conversation in [kind == "conversation" for kind in args.kinds]:
        for size in args.sizes:
            row = measure(att, size, conversation, args.new_tokens, args.reps)
            rows.append(row)
            print(
                f"{'conversation' if conversation else 'single-turn':>12} {row['prompt_tokens']:>5} tokens: "
                f"generate x{row['generate_ratio']:.3f}  attribute x{row['attribute_ratio']:.3f}  "
                f"(passes alone {row['seconds_median']['passes_alone']:.3f} s, "
                f"generate off {row['seconds_median']['generate_off']:.3f} s)",
                flush=True,
            )
            write(args, rows)  # after every row: a stopped run keeps what it measured
    plot(rows, args.out / "groundedness_cost.png")


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    report = {
        "what": "median seconds of each call with groundedness='measured' and 'off' (same prompt and answer), "
        "alternating in one process; ratios measured / off",
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "rows": rows,
    }
    (args.out / "groundedness_cost.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
