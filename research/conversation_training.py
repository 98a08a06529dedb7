"""Does training on conversations help? An estimator trained as `at2-rag train SINGLE CONVERSATIONS` does (each
set split 85/15 on its own, seed 0), against a baseline estimator (default: the shipped one), on the single-turn
held-out split (LDS over the collected masks) and on the conversations' own held-out split (top-1 agreement with
the lasso surrogate of their random masks). The leave-one-out evaluation is `at2-rag evaluate --conversations
--baseline FOLDER`.

    python -m research.conversation_training --out runs/estimator-conversations [--baseline FOLDER]

Run from the repository root (it imports research/context_scales.py).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from at2_rag.attribution.estimator import ScoreEstimator
from at2_rag.evaluation.metrics import lds, mean_se
from at2_rag.training.data import load_collected, mask_kinds, merge_collected
from at2_rag.training.train import report_summary, train_estimator
from research.context_scales import conversation_rows, top1_agreement

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


HELDOUT_FRACTION, SEED = 0.15, 0  # `at2-rag train`'s defaults


def heldout_lds(examples: list, weights: torch.Tensor) -> tuple[float, float]:
    values = []
    for ex in examples:
        for t in range(ex.features.shape[0]):
            if ex.labels[t].std() > 1e-4:
                value = lds((ex.features[t] @ weights).float(), ex.masks, ex.labels[t].float())
                if not math.isnan(value):
                    values.append(value)
    v = torch.tensor(values, dtype=torch.double)
    return float(v.mean()), float(v.std() / math.sqrt(len(v)))


def top1_vs_surrogate(examples: list, weights: torch.Tensor) -> dict[str, float]:
    """Share of conversation targets whose best-scored source is the random-mask surrogate's best."""
    return mean_se([top1_agreement([row], {}) for group in conversation_rows(examples, weights) for row in group])


def leave_one_out_hits(examples: list, weights: torch.Tensor) -> tuple[list[float], list[str]]:
    """Per target with leave-one-out masks (`collect --leave-one-out`): 1 when its best-scored source is the one
    whose removal alone lowers the target's log-odds most, else 0; and the example's kind (its id's last part)."""
    hits, kinds = [], []
    for ex in examples:
        rows = [i for i, kind in enumerate(mask_kinds(ex)) if kind == "leave_one_out"]
        if not rows:
            continue
        removed = (~ex.masks[rows]).float().argmax(dim=1)  # the source each leave-one-out mask removes
        for t in range(ex.labels.shape[0]):
            effect = torch.full((ex.masks.shape[1],), -math.inf)
            effect[removed] = ex.full[t] - ex.labels[t, rows]
            hits.append(float(int((ex.features[t] @ weights).argmax()) == int(effect.argmax())))
            kinds.append(ex.id.rsplit("-", 1)[-1])
    return hits, kinds


def top1_vs_leave_one_out(examples: list, weights: torch.Tensor) -> dict[str, float] | None:
    """The evaluation's metric (`leave_one_out_hits`) on the training conversations' held-out split."""
    hits, _ = leave_one_out_hits(examples, weights)
    return mean_se(hits) if hits else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", default="data/collected/smollm2-train")
    parser.add_argument("--conversations", nargs="+", default=["data/collected/smollm2-conversations"],
                        help="multi-turn shard folder(s); each is split on its own, as `at2-rag train` does")
    parser.add_argument("--leave-one-out", nargs="*", default=[], help="shard folder(s) of `collect --num-masks 0 "
                        "--leave-one-out` over the same conversations: their masks are added to those examples")
    parser.add_argument("--loo-weight", type=float, default=1.0, help="weight of the leave-one-out correlation")
    parser.add_argument("--out", default="runs/estimator-conversations")
    parser.add_argument("--baseline", help="estimator folder to compare with (default: the shipped one)")
    args = parser.parse_args()
    single = load_collected(args.single)
    folders = [args.single, *args.conversations, *args.leave_one_out]
    single, *multi_sets = merge_collected([single] + [load_collected(f) for f in folders[1:]], folders)
    multi = [ex for examples in multi_sets for ex in examples]
    # as `at2-rag train SINGLE CONVERSATIONS`: each set split on its own, so the single-turn held-out split is
    # the shipped estimator's
    estimator, report = train_estimator(
        single, 30, 9, model_id=MODEL, epochs=300, patience=30, progress=False, more_examples=multi_sets,
        heldout_fraction=HELDOUT_FRACTION, seed=SEED, loo_weight=args.loo_weight,
    )
    estimator.metadata["training_data"] = (
        f"{args.single} ({len(single)} single-turn examples) + "
        + " + ".join(f"{folder} ({len(examples)} multi-turn examples)" for folder, examples in
                     zip(args.conversations, multi_sets, strict=True))
        + " (scripts/build_conversations.py, collect --sources context), each split 85/15 on its own"
        + (f"; leave-one-out masks from {', '.join(args.leave_one_out)} (weight {args.loo_weight})"
           if args.leave_one_out else "")
    )
    estimator.save_pretrained(args.out)
    Path(args.out, "training_report.json").write_text(json.dumps(report, indent=2))
    held_ids = set(report["heldout_example_ids"])  # the training run's own split, not a recomputed one
    held_single = [ex for ex in single if ex.id in held_ids]
    held_multi = [ex for ex in multi if ex.id in held_ids]
    baseline = ScoreEstimator.from_folder(args.baseline) if args.baseline else ScoreEstimator.shipped(MODEL)
    result = {
        "baseline": args.baseline or "the shipped estimator",
        "single_turn_heldout_lds_baseline": heldout_lds(held_single, baseline.weights.detach()),
        "single_turn_heldout_lds_mixed": heldout_lds(held_single, estimator.weights.detach()),
        "conversation_heldout_top1_vs_surrogate_baseline": top1_vs_surrogate(held_multi, baseline.weights.detach()),
        "conversation_heldout_top1_vs_surrogate_mixed": top1_vs_surrogate(held_multi, estimator.weights.detach()),
        "conversation_heldout_top1_vs_leave_one_out_baseline": top1_vs_leave_one_out(held_multi,
                                                                                     baseline.weights.detach()),
        "conversation_heldout_top1_vs_leave_one_out_mixed": top1_vs_leave_one_out(held_multi,
                                                                                  estimator.weights.detach()),
        "mixed_training_report": report_summary(report),
    }
    Path(args.out, "comparison.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
