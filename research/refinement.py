"""Fidelity at a budget, offline: AT2+k vs ContextCite-k vs AT2 on the collected ablation data.

Every collected target carries 32 random ablation masks with their labels. For a budget k, the k most
informative masks of each target's 32 (as `choose_masks` picks them at run time) are the observed ablations,
the same for every method, and LDS is measured on the other 32 - k. The
refinement's prior strengths are chosen on the training split, the numbers reported on the held-out split
(the split the shipped estimator was trained with: 15 %, seed 0), with standard errors over targets.
Writes docs/bench/refinement.json and .png.

    python -m research.refinement [--collected data/collected/smollm2-train]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from at2_rag.attribution.estimator import ScoreEstimator
from at2_rag.attribution.refine import RefinementPrior, refine_scores
from at2_rag.evaluation.baselines import surrogate_scores
from at2_rag.evaluation.metrics import lds
from at2_rag.evidence.ablations import most_informative
from at2_rag.training.data import load_collected
from at2_rag.training.train import split_examples

BUDGETS = [1, 2, 4, 8, 16]
GRID = [0.01, 0.03, 0.1, 0.3, 1.0]


def targets(examples, weights):
    out = []
    for ex in examples:
        for t in range(ex.features.shape[0]):
            labels = ex.labels[t]
            if labels.std() > 1e-4:
                out.append((ex.features[t], ex.masks, labels))
    return out


def lds_values(rows, k, method):
    values = []
    for features, masks, labels in rows:
        held_masks, held_labels = masks[k:], labels[k:]
        if held_labels.std() < 1e-6:
            continue
        scores = method(features, masks[:k], labels[:k])
        value = lds(scores.float(), held_masks, held_labels.float())
        if not math.isnan(value):
            values.append(value)
    v = torch.tensor(values, dtype=torch.double)
    return float(v.mean()), float(v.std() / math.sqrt(len(v))), len(v)


def chosen_first(rows, k):
    """The same targets with the k most informative masks of their pool moved first (the rest for LDS)."""
    out = []
    for f, m, y in rows:
        order = most_informative(m, k)
        rest = [i for i in range(m.shape[0]) if i not in order]
        out.append((f, m[order + rest], y[order + rest]))
    return out


def median_slope(rows, weights):
    """Nats of log-odds per AT2 score unit: the median over targets of the least-squares slope."""
    slopes = []
    for f, m, y in rows:
        p = m.double() @ (f @ weights).double()
        p, yc = p - p.mean(), y.double() - y.double().mean()
        if float(p @ p) > 0:
            slopes.append(float(p @ yc) / float(p @ p))
    return float(torch.tensor(slopes).median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collected", default="data/collected/smollm2-train")
    parser.add_argument("--out", default="docs/bench/refinement")
    parser.add_argument(
        "--record", action="store_true", help="write the chosen prior settings into the shipped estimator's config.json"
    )
    args = parser.parse_args()

    estimator = ScoreEstimator.shipped("HuggingFaceTB/SmolLM2-135M-Instruct")
    weights = estimator.weights.detach()
    uniform = torch.full_like(weights, 1.0 / weights.numel())
    train_ex, held_ex = split_examples(load_collected(args.collected), 0.15, 0)
    train, held = targets(train_ex, weights), targets(held_ex, weights)
    scale = median_slope(train, weights)
    print(
        f"{len(train_ex)} training / {len(held_ex)} held-out examples, {len(train)} / {len(held)} targets; "
        f"prior scale {scale:.1f}"
    )

    def at2_plus(w, strength, scale_strength):
        prior = RefinementPrior(scale=scale, strength=strength, scale_strength=scale_strength)
        return lambda f, m, y: refine_scores(f @ w, m, y, prior)

    # prior strengths: chosen on (a quarter of) the training split, mean LDS over the budgets, chosen masks
    tuning = {k: chosen_first(train[::4], k) for k in (2, 4, 8, 16)}
    best = max(
        ((s, c) for s in GRID for c in GRID),
        key=lambda sc: sum(lds_values(tuning[k], k, at2_plus(weights, *sc))[0] for k in tuning),
    )
    print(f"chosen on the training split: prior_strength={best[0]}, scale_strength={best[1]}")

    methods = {
        "AT2 (0 passes)": lambda f, m, y: f @ weights,
        "average attention (0 passes)": lambda f, m, y: f @ uniform,
        "AT2+k": at2_plus(weights, *best),
        "average attention+k": at2_plus(uniform, *best),
        "ContextCite-k (lasso)": lambda f, m, y: surrogate_scores(m, y.float()),
    }
    # the headline: the k most informative masks of each target's pool (as at run time), the same for every
    # method, LDS on the rest
    results: dict[str, dict[int, tuple[float, float, int]]] = {name: {} for name in methods}
    for k in BUDGETS:
        rows = chosen_first(held, k)
        for name, method in methods.items():
            results[name][k] = lds_values(rows, k, method)
        print(
            f"k={k:2d} " + "  ".join(f"{n}: {results[n][k][0]:.3f}±{results[n][k][1]:.3f}" for n in methods), flush=True
        )

    # which masks to run: the first k random ones, or the k most informative of the same pool
    selection = {}
    for k in (2, 4, 8, 16):
        selection[k] = {
            "random: AT2+k": lds_values(held, k, methods["AT2+k"]),
            "random: ContextCite-k": lds_values(held, k, methods["ContextCite-k (lasso)"]),
            "most informative: AT2+k": results["AT2+k"][k],
            "most informative: ContextCite-k": results["ContextCite-k (lasso)"][k],
        }
        print(
            f"mask choice k={k}: " + "  ".join(f"{n}: {v[0]:.3f}±{v[1]:.3f}" for n, v in selection[k].items()),
            flush=True,
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "train_examples": len(train_ex),
        "heldout_examples": len(held_ex),
        "heldout_targets": len(held),
        "prior_scale": scale,
        "prior_strength": best[0],
        "scale_strength": best[1],
        "lds": {
            name: {str(k): {"mean": v[0], "sem": v[1], "n": v[2]} for k, v in r.items()} for name, r in results.items()
        },
        "mask_choice": {str(k): {n: {"mean": v[0], "sem": v[1]} for n, v in d.items()} for k, d in selection.items()},
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, r in results.items():
        ks = sorted(r)
        ax.errorbar(ks, [r[k][0] for k in ks], yerr=[r[k][1] for k in ks], marker="o", capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("extra forward passes (ablations k)")
    ax.set_ylabel(f"LDS on the other {32}-k masks (held-out)")
    ax.set_title(f"SmolLM2-135M, {len(held_ex)} held-out examples, {len(held)} targets")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    if args.record:
        record(report)


def record(report: dict) -> None:
    """The refinement settings go beside the estimator's weights: `RefinementPrior.from_metadata` reads them."""
    from research.shipped import record_metadata

    path = record_metadata(
        "refinement",
        {
            "prior_scale": report["prior_scale"],
            "prior_strength": report["prior_strength"],
            "scale_strength": report["scale_strength"],
            "chosen_on": f"training split ({report['train_examples']} examples), research/refinement.py",
        },
    )
    print(f"recorded the refinement settings in {path}")


if __name__ == "__main__":
    main()
