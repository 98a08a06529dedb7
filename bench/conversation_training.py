"""Does training on conversations help? An estimator trained on the single-turn training split plus the
multi-turn shards (`collect --sources context`), against the shipped one, on the single-turn held-out split
(LDS over the collected masks) and the multi-turn held-out evaluation (bench/conversations.py --estimator).

The held-out conversations here are the multi-turn set's own 15 % split, scored against the least-squares
surrogate of their random masks; the leave-one-out evaluation is `at2-rag evaluate --conversations`.

    python bench/conversation_training.py --out runs/estimator-conversations
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from context_scales import conversation_rows, top1_agreement

from at2_rag.estimator import ScoreEstimator
from at2_rag.evaluation.metrics import lds
from at2_rag.training.data import load_collected
from at2_rag.training.train import split_examples, train_estimator

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def heldout_lds(examples, weights) -> tuple[float, float]:
    values = []
    for ex in examples:
        for t in range(ex.features.shape[0]):
            if ex.labels[t].std() > 1e-4:
                value = lds((ex.features[t] @ weights).float(), ex.masks, ex.labels[t].float())
                if not math.isnan(value):
                    values.append(value)
    v = torch.tensor(values, dtype=torch.double)
    return float(v.mean()), float(v.std() / math.sqrt(len(v)))


def top1_vs_surrogate(examples, weights) -> dict[str, float]:
    """Share of conversation targets whose best-scored source is the random-mask surrogate's best."""
    hits = [top1_agreement([row], {}) for group in conversation_rows(examples, weights) for row in group]
    v = torch.tensor(hits, dtype=torch.double)
    return {"mean": float(v.mean()), "se": float(v.std() / math.sqrt(len(v))), "n": len(v)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", default="data/collected/smollm2-train")
    parser.add_argument("--conversations", default="data/collected/smollm2-conversations")
    parser.add_argument("--out", default="runs/estimator-conversations")
    args = parser.parse_args()
    single, multi = load_collected(args.single), load_collected(args.conversations)
    # as `at2-rag train SINGLE CONVERSATIONS`: each set split on its own, so the single-turn held-out split is
    # the shipped estimator's
    estimator, report = train_estimator(
        single, 30, 9, model_id=MODEL, epochs=300, patience=30, progress=False, more_examples=[multi]
    )
    estimator.metadata["training_data"] = (
        f"{args.single} ({len(single)} single-turn examples) + {args.conversations} ({len(multi)} multi-turn "
        "examples: scripts/build_conversations.py, collect --sources context), each split 85/15 on its own"
    )
    estimator.save_pretrained(args.out)
    Path(args.out, "training_report.json").write_text(json.dumps(report, indent=2))
    held_single = split_examples(single, 0.15, 0)[1]
    held_multi = split_examples(multi, 0.15, 0)[1]
    shipped = ScoreEstimator.shipped(MODEL)
    result = {
        "single_turn_heldout_lds_shipped": heldout_lds(held_single, shipped.weights.detach()),
        "single_turn_heldout_lds_mixed": heldout_lds(held_single, estimator.weights.detach()),
        "conversation_heldout_top1_vs_surrogate_shipped": top1_vs_surrogate(held_multi, shipped.weights.detach()),
        "conversation_heldout_top1_vs_surrogate_mixed": top1_vs_surrogate(held_multi, estimator.weights.detach()),
        "mixed_training_report": {k: v for k, v in report.items() if k not in ("history", "heldout_example_ids")},
    }
    Path(args.out, "comparison.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
