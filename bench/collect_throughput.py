"""Throughput of collection's ablation passes vs plain batched forward passes of the same tokens.

For a few real training examples: generate the answer once, then time (a) the 32 ablation passes exactly as
`at2-rag collect` runs them (attention masks, answer-only LM head, label computation) and (b) plain batched
forward passes over the same token batches (no mask, full logits). Both alternate in one process; prints the
throughput ratio (a)/(b) in tokens per second. Target: >= 90%.

    python bench/collect_throughput.py [--examples 3] [--batch-size 8] [--reps 2] [--out docs/bench]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    args = parser.parse_args()

    from at2_rag import Attributor, ScoreEstimator
    from at2_rag.models import load_default_model
    from at2_rag.training.ablation import ablation_attention_mask, answer_logit_probs, random_masks, target_log_odds
    from at2_rag.training.collect import NUM_MASKS
    from at2_rag.training.data import read_examples
    from at2_rag.features import answer_targets

    model, tokenizer = load_default_model()
    attributor = Attributor(model, tokenizer, estimator=ScoreEstimator.uniform(30, 9))
    examples = read_examples(ROOT / "data" / "rag_python_docs" / "train.jsonl")[: args.examples]
    rows = []
    for ex in examples:
        run = attributor.generate_run(ex.query, ex.documents, max_new_tokens=48)
        targets = answer_targets(run.answer)
        ids = run.prompt.input_ids + run.answer.token_ids
        a_len = len(run.answer.token_ids)
        masks = random_masks(len(run.prompt.doc_token_spans), NUM_MASKS, 0.5, torch.Generator().manual_seed(0))
        attention = ablation_attention_mask(len(ids), run.prompt.doc_token_spans, masks)
        ids_t = torch.tensor(ids)

        def ablation() -> None:
            lp = answer_logit_probs(model, ids, a_len, attention, args.batch_size)
            for _, r in targets:
                target_log_odds(lp, r)

        def plain() -> None:
            with torch.no_grad():
                for start in range(0, NUM_MASKS, args.batch_size):
                    b = min(args.batch_size, NUM_MASKS - start)
                    model(input_ids=ids_t.expand(b, len(ids)), use_cache=False)

        ablation(), plain()  # warm-up
        t_ab, t_pl = [], []
        for _ in range(args.reps):
            t = time.perf_counter(); ablation(); t_ab.append(time.perf_counter() - t)
            t = time.perf_counter(); plain(); t_pl.append(time.perf_counter() - t)
        tokens = NUM_MASKS * len(ids)
        row = {
            "example": ex.id,
            "sequence_tokens": len(ids),
            "ablation_tokens_per_s": tokens / statistics.median(t_ab),
            "plain_tokens_per_s": tokens / statistics.median(t_pl),
        }
        row["throughput_ratio"] = row["ablation_tokens_per_s"] / row["plain_tokens_per_s"]
        rows.append(row)
        print(f"{ex.id[:50]:<50} {len(ids):>5} tok  ablation/plain throughput x{row['throughput_ratio']:.3f}", flush=True)
    mean_ratio = statistics.mean(r["throughput_ratio"] for r in rows)
    print(f"mean throughput ratio: {mean_ratio:.3f} (target >= 0.90)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "collect_throughput.json").write_text(
        json.dumps({"threads": torch.get_num_threads(), "batch_size": args.batch_size, "rows": rows, "mean_ratio": mean_ratio}, indent=2)
    )


if __name__ == "__main__":
    main()
