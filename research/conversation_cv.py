"""Which training recipe ranks conversation sources like leave-one-out? Grouped 5-fold cross-validation over the
training conversations that have leave-one-out masks (`collect --leave-one-out`).

Each fold trains as `at2-rag train` does (the single-turn examples plus the other folds' conversations, each set
split 85/15 for early stopping) and counts, on the fold's conversations, the targets whose best-scored source is
the one whose removal alone lowers the target's log-odds most: the evaluation's top-1 metric, on all 621 targets of
the 288 training conversations instead of the 94 of one training run's held-out split, so recipes are chosen on
training data with a standard error of about 0.014 (and a paired one, against the shipped recipe, about half that).
The held-out file is never read.

Variants: the shipped recipe (leave-one-out weight 1); other leave-one-out weights, learning rates and batch size;
one weight vector per source kind (documents, user turns, assistant turns, system prompt, question) beside the
shared one; with `--single-leave-one-out FOLDER` (`collect --sources documents --num-masks 0 --leave-one-out` over
the single-turn training examples) their leave-one-out masks added to training. Writes docs/bench/conversation_cv.json.

`--seeds N` trains every fold with seeds 0..N-1 and averages each target's hit over them: a single training run is
noisy at the level of the differences measured here (the seed draws the early-stopping split and the batches), which
the standard errors over targets leave out. It also reports the spread between seeds and the weights averaged over
them.

    python -m research.conversation_cv [--variants recipe loo3 ...] [--single-leave-one-out FOLDER] [--seeds N]

Run from the repository root (it imports research/conversation_training.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from at2_rag.evaluation.metrics import mean_se
from at2_rag.training.data import CollectedExample, load_collected, merge_collected
from at2_rag.training.train import train_estimator
from research.conversation_training import leave_one_out_hits

FOLDS = 5
NUM_HEADS = 9
KIND_BLOCKS = ("document", "user turn", "assistant turn", "system", "question")

VARIANTS: dict[str, dict[str, Any]] = {
    "recipe": {},
    "loo0": {"loo_weight": 0.0},
    "loo0.5": {"loo_weight": 0.5},
    "loo2": {"loo_weight": 2.0},
    "loo3": {"loo_weight": 3.0},
    "loo5": {"loo_weight": 5.0},
    "lr3e-3": {"lr": 3e-3},
    "lr3e-4": {"lr": 3e-4},
    "batch16": {"batch_size": 16},
    "kind_weights": {"kind_blocks": True},
    "single_loo": {"single_loo": True},
}


def source_kind(source_id: str) -> int:
    """Index in KIND_BLOCKS: in these conversations history turn 0 is the user's, turn 1 the assistant's."""
    if source_id.startswith("history:"):
        return 1 + int(source_id.split(":")[1]) % 2
    return {"system": 3, "query": 4}.get(source_id, 0)


def with_kind_blocks(ex: CollectedExample) -> CollectedExample:
    """Features `[T, S, D]` -> `[T, S, D * (1 + kinds)]`: the shared block, and a copy in the source's kind block
    (zeros elsewhere), so a linear estimator learns a shared weight vector plus a correction per kind."""
    out = copy.copy(ex)
    t, s, d = ex.features.shape
    features = torch.zeros(t, s, d * (1 + len(KIND_BLOCKS)))
    features[..., :d] = ex.features
    ids = ex.meta.get("source_ids") or []
    for j in range(s):
        k = source_kind(str(ids[j])) if ex.meta.get("sources") == "context" else 0
        features[:, j, d * (1 + k) : d * (2 + k)] = ex.features[:, j]
    out.features = features
    return out


def cross_validate(single: list[CollectedExample], conversations: list[CollectedExample],
                   single_loo: list[CollectedExample] | None, options: dict[str, Any],
                   seeds: int = 1) -> tuple[list[list[float]], list[float], list[str]]:
    """Per training seed (0..seeds-1: it draws the early-stopping split and the batches), every target's hit;
    the hits of the weights averaged over the seeds (each scaled to unit norm, one linear estimator at the same
    cost); the targets' follow-up kinds."""
    options = dict(options)
    kind_blocks = options.pop("kind_blocks", False)
    if options.pop("single_loo", False):
        if single_loo is None:
            raise SystemExit("variant single_loo needs --single-leave-one-out FOLDER")
        single = merge_collected([single, single_loo], ["single", "single leave-one-out"])[0]
    if kind_blocks:
        single, conversations = [with_kind_blocks(e) for e in single], [with_kind_blocks(e) for e in conversations]
    order = list(range(len(conversations)))
    random.Random(123).shuffle(order)
    hits: list[list[float]] = [[] for _ in range(seeds)]
    averaged, kinds = [], []
    for fold in range(FOLDS):
        test = set(order[fold::FOLDS])
        held = [conversations[i] for i in sorted(test)]
        weights = []
        for seed in range(seeds):
            estimator, _ = train_estimator(
                single, conversations[0].features.shape[-1] // NUM_HEADS, NUM_HEADS, epochs=300, patience=30,
                progress=False, more_examples=[[c for i, c in enumerate(conversations) if i not in test]],
                seed=seed, **options,
            )
            weights.append(estimator.weights.detach())
            fold_hits, fold_kinds = leave_one_out_hits(held, weights[-1])
            hits[seed] += fold_hits
        averaged += leave_one_out_hits(held, torch.stack([w / w.norm() for w in weights]).mean(0))[0]
        kinds += fold_kinds
    return hits, averaged, kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", default="data/collected/smollm2-train")
    parser.add_argument("--conversations", nargs="+", default=[
        "data/collected/smollm2-conversations", "data/collected/smollm2-conversations-more"])
    parser.add_argument("--leave-one-out", nargs="+", default=[
        "data/collected/smollm2-conversations-loo", "data/collected/smollm2-conversations-more-loo"],
        help="leave-one-out masks of the same conversations")
    parser.add_argument("--single-leave-one-out", help="leave-one-out masks of the single-turn examples")
    parser.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "single_loo"],
                        choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=1, help="train every fold with seeds 0..N-1: the spread "
                        "between seeds (training noise, which the standard errors over targets leave out), and the "
                        "weights averaged over the seeds")
    parser.add_argument("--out", default="docs/bench/conversation_cv.json")
    args = parser.parse_args()
    folders = [args.single, *args.conversations, *args.leave_one_out]
    single, *sets = merge_collected([load_collected(f) for f in folders], folders)
    conversations = [ex for group in sets for ex in group]
    single_loo = load_collected(args.single_leave_one_out) if args.single_leave_one_out else None
    variants = ["recipe"] + [v for v in args.variants if v != "recipe"]
    report: dict[str, Any] = {"conversations": len(conversations), "folders": folders,
                              "single_leave_one_out": args.single_leave_one_out, "seeds": args.seeds,
                              "variants": {}}
    recipe_hits: list[list[float]] = []
    for name in variants:
        start = time.time()
        hits, averaged, kinds = cross_validate(single, conversations, single_loo, VARIANTS[name], args.seeds)
        recipe_hits = recipe_hits or hits
        # each target's hit averaged over the seeds: the standard errors stay over the 621 targets
        per_target = [sum(column) / len(column) for column in zip(*hits, strict=True)]
        recipe_per_target = [sum(column) / len(column) for column in zip(*recipe_hits, strict=True)]
        by_kind = defaultdict(list)
        for kind, hit in zip(kinds, per_target, strict=True):
            by_kind[kind].append(hit)
        report["variants"][name] = {
            "top1_vs_leave_one_out": mean_se(per_target),
            "minus_recipe": mean_se([a - b for a, b in zip(per_target, recipe_per_target, strict=True)]),
            "by_kind": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_kind.items())},
            "seconds": round(time.time() - start, 1),
        }
        row = report["variants"][name]
        top1 = row["top1_vs_leave_one_out"]
        line = (f"{name:14s} top-1 {top1['mean']:.3f} ± {top1['se']:.3f}"
                f"  vs recipe {row['minus_recipe']['mean']:+.3f} ± {row['minus_recipe']['se']:.3f}  {row['by_kind']}")
        if args.seeds > 1:
            per_seed = [sum(h) / len(h) for h in hits]
            row["top1_per_seed"] = [round(v, 4) for v in per_seed]
            row["top1_seed_sd"] = round(float(torch.tensor(per_seed).std()), 4)
            row["top1_averaged_weights"] = mean_se(averaged)
            row["averaged_minus_seed_0"] = mean_se([a - b for a, b in zip(averaged, hits[0], strict=True)])
            line += (f"\n{'':14s} per seed {row['top1_per_seed']} (sd {row['top1_seed_sd']:.3f}); weights averaged "
                     f"over the seeds {row['top1_averaged_weights']['mean']:.3f}, minus seed 0 "
                     f"{row['averaged_minus_seed_0']['mean']:+.3f} ± {row['averaged_minus_seed_0']['se']:.3f}")
        print(line, flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
