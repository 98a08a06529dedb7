"""Fidelity at a budget, offline: AT2+k vs ContextCite-k vs AT2 on the collected ablation data.

Every collected target carries 32 random ablation masks with their labels. For a budget k, the k most
informative masks of each target's 32 (as `choose_masks` picks them at run time) are the observed ablations,
the same for every method, and LDS is measured on the other 32 - k. The
refinement's prior is chosen on the training split as `at2-rag train` chooses it (`fit_refinement_prior`,
at2_rag/training/refinement.py), the numbers reported on the held-out split (the split the shipped estimator was
trained with: 15 %, seed 0), with standard errors over targets. Writes docs/bench/refinement.json and .png.

    python -m research.refinement [--collected data/collected/smollm2-train]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from at2_rag.attribution.estimator import ScoreEstimator
from at2_rag.evaluation.baselines import surrogate_scores
from at2_rag.training.data import load_collected
from at2_rag.training.refinement import (
    chosen_first,
    fit_refinement_prior,
    mean_lds,
    median_slope,
    refined,
    refinement_targets,
)
from at2_rag.training.train import split_examples

BUDGETS = [1, 2, 4, 8, 16]

# the protocol is the package's (`at2-rag train` chooses the prior with it); refinement_limits.py imports these names
__all__ = ["chosen_first", "lds_values", "median_slope", "targets"]
lds_values = mean_lds


def targets(examples, weights):
    """Every target whose labels vary, with its random masks (`refinement_targets`)."""
    return refinement_targets(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collected", default="data/collected/smollm2-train")
    parser.add_argument("--out", default="docs/bench/refinement")
    args = parser.parse_args()

    estimator = ScoreEstimator.shipped("HuggingFaceTB/SmolLM2-135M-Instruct")
    weights = estimator.weights.detach()
    uniform = torch.full_like(weights, 1.0 / weights.numel())
    train_ex, held_ex = split_examples(load_collected(args.collected), 0.15, 0)
    train, held = refinement_targets(train_ex), refinement_targets(held_ex)
    prior = fit_refinement_prior(train_ex, weights)[0]
    assert prior is not None
    scale = prior["prior_scale"]
    print(
        f"{len(train_ex)} training / {len(held_ex)} held-out examples, {len(train)} / {len(held)} targets; "
        f"prior scale {scale:.1f}"
    )

    def at2_plus(w, strength, scale_strength):
        return refined(w, scale, strength, scale_strength)

    # prior strengths: chosen on (a quarter of) the training split, mean LDS over the budgets, chosen masks
    best = (prior["prior_strength"], prior["scale_strength"])
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


if __name__ == "__main__":
    main()
