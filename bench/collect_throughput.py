"""Throughput of collection's ablation passes vs plain batched forward passes of the same tokens.

For a few real training examples: generate the answer once, then time (a) the 1 + 32 ablation passes exactly
as `at2-rag collect` runs them (prefix sharing, attention masks, answer-only LM head, label computation),
(b) the same ablations as independent full passes (no prefix sharing) and (c) plain batched forward passes over
the same tokens (no mask, full logits). All alternate in one process; prints the throughput ratios (a)/(c) and
(b)/(c) in ablated sequence tokens per second. Target: (a)/(c) >= 90%.

    python bench/collect_throughput.py [--examples 3] [--batch-size 33] [--reps 2] [--out docs/bench]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
from at2_rag.training.collect import NUM_MASKS  # noqa: E402 - the masks collection uses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=NUM_MASKS + 1)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    args = parser.parse_args()

    from at2_rag import Attributor, ScoreEstimator
    from at2_rag.capture.masked import (
        ablated_answer_logit_probs,
        ablation_attention_mask,
        answer_logit_probs,
        random_masks,
        target_log_odds,
    )
    from at2_rag.models import load_default_model
    from at2_rag.prompting.answer import answer_targets
    from at2_rag.training.data import read_examples

    model, tokenizer = load_default_model()
    attributor = Attributor(model, tokenizer, estimator=ScoreEstimator.uniform(30, 9))
    examples = read_examples(ROOT / "data" / "rag_python_docs" / "train.jsonl")[: args.examples]
    rows = []
    for ex in examples:
        run = attributor.run(attributor.prepare({"query": ex.query, "documents": ex.documents}, max_new_tokens=48))
        targets = answer_targets(run.answer)
        ids = run.prompt.input_ids + run.answer.token_ids
        a_len = len(run.answer.token_ids)
        spans = run.prompt.doc_token_spans
        masks = random_masks(len(spans), NUM_MASKS, 0.5, torch.Generator().manual_seed(0))
        masks = torch.cat([torch.ones(1, len(spans), dtype=torch.bool), masks])  # as collect: row 0 keeps all
        num = masks.shape[0]
        ids_t = torch.tensor(ids)

        def labels(lp: torch.Tensor) -> None:
            for _, r in targets:
                target_log_odds(lp, r)

        def shared() -> None:
            labels(ablated_answer_logit_probs(model, ids, a_len, spans, masks, args.batch_size))

        def full() -> None:
            attention = ablation_attention_mask(len(ids), spans, masks)
            labels(answer_logit_probs(model, ids, a_len, attention, args.batch_size))

        def plain() -> None:
            with torch.no_grad():
                for start in range(0, num, args.batch_size):
                    b = min(args.batch_size, num - start)
                    model(input_ids=ids_t.expand(b, len(ids)), use_cache=False)

        variants = {"shared_prefix": shared, "full_passes": full, "plain": plain}
        times: dict[str, list[float]] = {k: [] for k in variants}
        for fn in variants.values():
            fn()  # warm-up
        for _ in range(args.reps):
            for name, fn in variants.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        tokens = num * len(ids)
        row = {"example": ex.id, "sequence_tokens": len(ids), "masks": num}
        for name in variants:
            row[f"{name}_tokens_per_s"] = tokens / statistics.median(times[name])
        row["throughput_ratio"] = row["shared_prefix_tokens_per_s"] / row["plain_tokens_per_s"]
        row["full_passes_ratio"] = row["full_passes_tokens_per_s"] / row["plain_tokens_per_s"]
        rows.append(row)
        print(
            f"{ex.id[:50]:<50} {len(ids):>5} tok  collect/plain x{row['throughput_ratio']:.3f}  "
            f"(without prefix sharing x{row['full_passes_ratio']:.3f})",
            flush=True,
        )
    mean_ratio = statistics.mean(r["throughput_ratio"] for r in rows)
    mean_full = statistics.mean(r["full_passes_ratio"] for r in rows)
    print(f"mean throughput ratio: {mean_ratio:.3f} (target >= 0.90); without prefix sharing {mean_full:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "collect_throughput.json").write_text(json.dumps({
        "threads": torch.get_num_threads(), "batch_size": args.batch_size, "rows": rows,
        "mean_ratio": mean_ratio, "mean_ratio_without_prefix_sharing": mean_full,
    }, indent=2))
    plot(rows, args.out / "collect_throughput.png")
    print(f"wrote {args.out / 'collect_throughput.json'} and collect_throughput.png")


def plot(rows: list[dict], path: Path) -> None:
    """Ablated sequence tokens per second of each variant, relative to plain passes, per example."""
    from at2_rag.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    labels = [f"{r['sequence_tokens']} tok" for r in rows]
    width = 0.38
    for k, (key, name) in enumerate([("throughput_ratio", "collect (prefix sharing)"),
                                      ("full_passes_ratio", "masked full passes")]):
        ax.bar([i + (k - 0.5) * width for i in range(len(rows))], [100 * r[key] for r in rows], width, label=name)
    ax.axhline(100, color="k", lw=1, label="plain batched passes")
    ax.axhline(90, color="r", ls="--", lw=1, label="target 90%")
    ax.set_xticks(range(len(rows)), labels)
    ax.set(ylabel="throughput vs plain (%)", title="Ablation passes: tokens/s relative to plain forward passes")
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
