"""Would one multiplier per kind of context source (system prompt, earlier turns, question) put them on the
documents' scale? Tried on the multi-turn training conversations and not adopted (docs/training-studies.md).

The estimator's head weights are learned mostly from document ablations, and the same weights score the context
parts, whose attention may not read the same way.

Each collected conversation target (`collect --sources context`) has 32 random masks over the documents, the
system prompt, the earlier turns and the question; the lasso (ContextCite) surrogate on them says which source the
sentence stands on most. The multipliers (one per context kind, from a grid) are chosen so that the estimator's
best source is the surrogate's best as often as possible; grouped 5-fold cross-validation over conversations says
what the choice is worth on conversations it did not see.

    python -m research.context_scales [--estimator FOLDER]   # writes docs/bench/context_scales.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch

from at2_rag.attribution.estimator import ScoreEstimator
from at2_rag.evaluation.baselines import surrogate_scores
from at2_rag.evaluation.metrics import mean_se
from at2_rag.training.data import load_collected, mask_kinds

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
FOLDS = 5
CONTEXT_KINDS = ("system", "history", "query")
SCALE_GRID = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)


def top1_agreement(rows, scales: dict[str, float]) -> float:
    """Share of targets whose best-scored source (scores scaled per kind) is the reference's best. `rows`:
    (scores `[sources]`, reference effects `[sources]`, kind of each source)."""
    hits = 0
    for scores, reference, kinds in rows:
        scaled = scores.double() * torch.tensor([scales.get(k, 1.0) for k in kinds], dtype=torch.double)
        hits += int(scaled.argmax()) == int(reference.argmax())
    return hits / len(rows)


def fit_context_scales(rows) -> dict[str, float]:
    """The grid multipliers with the best top-1 agreement; ties go to those closest to 1 (no change)."""
    combos = itertools.product(SCALE_GRID, repeat=len(CONTEXT_KINDS))
    best = max(combos, key=lambda c: (top1_agreement(rows, dict(zip(CONTEXT_KINDS, c))),
                                      -sum(abs(math.log(v)) for v in c)))
    return dict(zip(CONTEXT_KINDS, best))


def source_kinds(meta: dict) -> list[str]:
    """"document" for the first `num_documents` sources, else the context key's kind ("history:1" -> "history")."""
    n_docs = int(meta["num_documents"])
    return ["document"] * n_docs + [key.split(":")[0] for key in meta["source_ids"][n_docs:]]


def conversation_rows(examples, weights) -> list[list[tuple[torch.Tensor, torch.Tensor, list[str]]]]:
    """Per conversation, its targets as (AT2 scores, surrogate effects on the random masks, source kinds)."""
    out = []
    for ex in examples:
        kinds = source_kinds(ex.meta)
        random = [i for i, kind in enumerate(mask_kinds(ex)) if kind == "random"]
        rows = []
        for t in range(ex.labels.shape[0]):
            labels = ex.labels[t, random]
            if labels.std() > 1e-4:
                rows.append(((ex.features[t] @ weights).detach(), surrogate_scores(ex.masks[random], labels), kinds))
        out.append(rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", default="data/collected/smollm2-conversations")
    parser.add_argument("--out", default="docs/bench/context_scales.json")
    parser.add_argument("--estimator", help="estimator folder whose scores are scaled (default: the shipped one)")
    args = parser.parse_args()
    estimator = ScoreEstimator.from_folder(args.estimator) if args.estimator else ScoreEstimator.shipped(MODEL)
    examples = load_collected(args.conversations)
    grouped = conversation_rows(examples, estimator.weights.detach())
    rows = [r for g in grouped for r in g]

    hits_scaled, hits_plain, chosen_per_fold = [], [], []
    for fold in range(FOLDS):
        fit = [r for i, g in enumerate(grouped) if i % FOLDS != fold for r in g]
        test = [r for i, g in enumerate(grouped) if i % FOLDS == fold for r in g]
        scales = fit_context_scales(fit)
        chosen_per_fold.append(scales)
        hits_scaled += [top1_agreement([r], scales) for r in test]
        hits_plain += [top1_agreement([r], {}) for r in test]

    scales = fit_context_scales(rows)
    paired = [a - b for a, b in zip(hits_scaled, hits_plain, strict=True)]
    report = {
        "conversations": len(examples),
        "targets": len(rows),
        "scales": scales,
        "in_sample_top1_scaled": top1_agreement(rows, scales),
        "in_sample_top1_unscaled": top1_agreement(rows, {}),
        "cross_validated_top1_scaled": mean_se(hits_scaled),
        "cross_validated_top1_unscaled": mean_se(hits_plain),
        "cross_validated_gain": mean_se(paired),
        "scales_per_fold": chosen_per_fold,
        "reference": "lasso (ContextCite) surrogate on each target's 32 random masks",
        "estimator": args.estimator or "the shipped estimator",
    }
    print(json.dumps(report, indent=2))
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
