"""What limits AT2+k at k=4? Variants of the refinement, offline on the collected ablations (research/refinement.py's
split and protocol: settings chosen on the training split, LDS on held-out targets, the k most informative masks
observed, LDS on the rest), and mask designs on the evaluation cache (64 random + leave-one-out masks per
example, LDS on 32 fresh masks).

- heteroscedastic prior: a source's residual prior variance grows with its AT2 score, `c + (|s_i| / max|s|)^p`;
- pooled: one residual shared by all sentences of an answer (they see the same masks) plus each sentence's own;
- power: the prior is `sign(s) |s|^p` instead of the scores themselves;
- designs: leave-one-out of the top-scored sources, alone or with the rest D-optimal, against D-optimal;
- oracle: the prior direction mixed with the lasso surrogate of all 32 masks (in-sample, unattainable),
  which says how good a zero-pass prior must be for LDS(AT2+4) >= 0.80.

    python -m research.refinement_limits   # writes docs/bench/refinement_limits.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from at2_rag.attribution.estimator import ScoreEstimator
from at2_rag.attribution.refine import RefinementPrior, refine_scores
from at2_rag.capture.masked import target_log_odds
from at2_rag.evaluation.ablation_cache import ExampleAblations
from at2_rag.evaluation.baselines import surrogate_scores
from at2_rag.evaluation.metrics import lds
from at2_rag.evidence.ablations import most_informative
from at2_rag.training.data import load_collected
from at2_rag.training.train import split_examples
from research.refinement import chosen_first, lds_values, median_slope, targets

BUDGETS = (2, 4, 8)


def mean_sem(values: list[float]) -> dict[str, float]:
    v = torch.tensor(values, dtype=torch.double)
    return {"mean": float(v.mean()), "sem": float(v.std() / math.sqrt(len(v))), "n": len(v)}


def general_refine(s, masks, labels, scale, strength, scale_strength, variance=None):
    """refine_scores with a per-source residual prior variance (`variance`, mean 1; None = isotropic)."""
    if masks.shape[0] == 0:
        return s.clone()
    s, x, y = s.double(), masks.double(), labels.double()
    k, n = x.shape
    design = torch.cat([torch.ones(k, 1, dtype=torch.double), (x @ s).unsqueeze(1), x], dim=1)
    penalty = torch.zeros(n + 2, n + 2, dtype=torch.double)
    norm = float(s @ s) or 1.0
    penalty[0, 0] = 1e-9
    penalty[1, 1] = scale_strength * norm
    v = torch.ones(n, dtype=torch.double) if variance is None else variance.double()
    penalty[2:, 2:] = torch.diag(strength / v)
    rhs = design.T @ y
    rhs[1] += scale_strength * norm * scale
    solution = torch.linalg.lstsq(design.T @ design + penalty, rhs.unsqueeze(1)).solution.squeeze(1)
    return (solution[1] * s + solution[2:]) / scale


def score_variance(s, c, p):
    a = s.double().abs() / (s.double().abs().max() + 1e-12)
    v = c + a**p
    return v / v.mean()


def pooled_refine(prior_scores, masks, labels, scale, strength, scale_strength, shared_strength):
    """All sentences of one answer at once: beta_t = g_t s_t + d_t + e, e shared by the sentences."""
    t_count, n = prior_scores.shape
    k = masks.shape[0]
    x = masks.double()
    size = t_count * (n + 2) + n
    lhs = torch.zeros(size, size, dtype=torch.double)
    rhs = torch.zeros(size, dtype=torch.double)
    for t in range(t_count):
        s = prior_scores[t].double()
        o = t * (n + 2)
        design = torch.zeros(k, size, dtype=torch.double)
        design[:, o] = 1.0
        design[:, o + 1] = x @ s
        design[:, o + 2 : o + 2 + n] = x
        design[:, t_count * (n + 2) :] = x
        lhs += design.T @ design
        rhs += design.T @ labels[t].double()
        norm = float(s @ s) or 1.0
        lhs[o, o] += 1e-9
        lhs[o + 1, o + 1] += scale_strength * norm
        rhs[o + 1] += scale_strength * norm * scale
        lhs[o + 2 : o + 2 + n, o + 2 : o + 2 + n] += strength * torch.eye(n, dtype=torch.double)
    lhs[t_count * (n + 2) :, t_count * (n + 2) :] += shared_strength * torch.eye(n, dtype=torch.double)
    solution = torch.linalg.lstsq(lhs, rhs.unsqueeze(1)).solution.squeeze(1)
    shared = solution[t_count * (n + 2) :]
    return torch.stack([
        (solution[t * (n + 2) + 1] * prior_scores[t].double() + solution[t * (n + 2) + 2 : (t + 1) * (n + 2)] + shared)
        / scale
        for t in range(t_count)
    ])


def pooled_lds(examples, weights, k, refine) -> list[float]:
    values = []
    for ex in examples:
        kept = [t for t in range(ex.features.shape[0]) if ex.labels[t].std() > 1e-4]
        if not kept:
            continue
        order = most_informative(ex.masks, k)
        order += [i for i in range(ex.masks.shape[0]) if i not in order]
        masks, labels = ex.masks[order], ex.labels[kept][:, order]
        refined = refine(torch.stack([ex.features[t] @ weights for t in kept]), masks[:k], labels[:, :k])
        for i in range(len(kept)):
            if labels[i, k:].std() >= 1e-6:
                value = lds(refined[i].float(), masks[k:], labels[i, k:].float())
                if not math.isnan(value):
                    values.append(value)
    return values


def power(s, p):
    top = s.double().abs().max() + 1e-12
    return torch.sign(s.double()) * (s.double().abs() / top) ** p * top


def design_lds(cache: list[ExampleAblations], estimator, prior, k, design: Callable) -> list[float]:
    values = []
    for d in cache:
        distinct = sorted({tuple(m): i for i, m in reversed(list(enumerate(d.surrogate_masks.tolist())))}.values())
        pool, pool_lp = d.surrogate_masks[distinct], d.surrogate_lp[distinct]
        scores = torch.stack([estimator(f) for f in d.features]).detach()
        masks, lps = design(pool, pool_lp, ~torch.eye(d.num_sources, dtype=torch.bool), d.loo_lp, scores[-1], k)
        for t, rows in enumerate(d.target_rows[:-1]):
            refined = refine_scores(scores[t], masks, target_log_odds(lps, rows), prior)
            value = lds(refined.float(), d.lds_masks, target_log_odds(d.lds_lp, rows).float())
            if not math.isnan(value):
                values.append(value)
    return values


def d_optimal(pool, pool_lp, loo, loo_lp, whole_scores, k):
    chosen = most_informative(pool, k)
    return pool[chosen], pool_lp[chosen]


def loo_top(pool, pool_lp, loo, loo_lp, whole_scores, k):
    order = whole_scores.argsort(descending=True)[:k]
    return loo[order], loo_lp[order]


def loo_top_then_d_optimal(pool, pool_lp, loo, loo_lp, whole_scores, k):
    order = whole_scores.argsort(descending=True)[: min(k - 1, loo.shape[0])]
    rest = most_informative(pool, k - len(order))
    return torch.cat([loo[order], pool[rest]]), torch.cat([loo_lp[order], pool_lp[rest]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collected", default="data/collected/smollm2-train")
    parser.add_argument("--cache", default="data/eval-cache/smollm2-heldout")
    parser.add_argument("--out", default="docs/bench/refinement_limits.json")
    args = parser.parse_args()
    estimator = ScoreEstimator.shipped("HuggingFaceTB/SmolLM2-135M-Instruct")
    weights = estimator.weights.detach()
    prior = RefinementPrior.from_metadata(estimator.metadata)
    train_ex, held_ex = split_examples(load_collected(args.collected), 0.15, 0)
    train, held = targets(train_ex, weights), targets(held_ex, weights)
    scale = median_slope(train, weights)
    tune = {k: chosen_first(train[::4], k) for k in BUDGETS}
    hold = {k: chosen_first(held, k) for k in BUDGETS}
    report: dict = {"heldout_targets": len(held)}

    def on(rows, method):
        return {str(k): lds_values(rows[k], k, method)[0] for k in BUDGETS}

    def held_out(method):
        return {str(k): dict(zip(("mean", "sem", "n"), lds_values(hold[k], k, method), strict=True)) for k in BUDGETS}

    def best_on_training(name, grid, make):
        chosen = max(grid, key=lambda g: on(tune, make(*g))["4"])
        report[name] = {"chosen_on_training_split": chosen, "heldout": held_out(make(*chosen))}
        print(name, chosen, {k: round(v["mean"], 4) for k, v in report[name]["heldout"].items()}, flush=True)

    report["isotropic (shipped)"] = {"heldout": held_out(lambda f, m, y: refine_scores(f @ weights, m, y, prior))}
    print("isotropic", {k: round(v["mean"], 4) for k, v in report["isotropic (shipped)"]["heldout"].items()})
    strengths = list(itertools.product([0.1, 0.3, 1.0], [0.03, 0.1]))
    best_on_training(
        "heteroscedastic prior", [(a, b, c, p) for a, b in strengths for c in (0.0, 0.2, 1.0) for p in (0.5, 1, 2)],
        lambda a, b, c, p: lambda f, m, y: general_refine(
            f @ weights, m, y, scale, a, b, score_variance(f @ weights, c, p)
        ),
    )
    best_on_training(
        "power prior", [(a, b, p) for a, b in strengths for p in (0.5, 0.75, 1.5, 2.0)],
        lambda a, b, p: lambda f, m, y: general_refine(power(f @ weights, p), m, y, scale, a, b),
    )
    grid = [(a, b, c) for a, b in strengths[:4] for c in (0.3, 1.0, 3.0)]
    chosen = max(grid, key=lambda g: mean_sem(pooled_lds(
        train_ex[::4], weights, 4, lambda s, m, y: pooled_refine(s, m, y, scale, *g)))["mean"])
    report["pooled over an answer's sentences"] = {"chosen_on_training_split": chosen, "heldout": {
        str(k): mean_sem(pooled_lds(held_ex, weights, k, lambda s, m, y: pooled_refine(s, m, y, scale, *chosen)))
        for k in BUDGETS}}
    print("pooled", chosen, {k: round(v["mean"], 4) for k, v in report["pooled over an answer's sentences"]
                             ["heldout"].items()}, flush=True)

    cache = [ExampleAblations.load(p) for p in sorted(Path(args.cache).glob("*.safetensors"))]
    report["designs (evaluation cache, all targets)"] = {
        design.__name__: {str(k): mean_sem(design_lds(cache, estimator, prior, k, design)) for k in BUDGETS}
        for design in (d_optimal, loo_top, loo_top_then_d_optimal)
    }
    print("designs", json.dumps(report["designs (evaluation cache, all targets)"]), flush=True)

    oracle = {}
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        mixed = []
        for f, m, y in held:
            s = (f @ weights).double()
            direction = surrogate_scores(m, y.float()).double()
            mixed.append((((1 - alpha) * s + alpha * direction * s.norm() / (direction.norm() + 1e-12)).float(), m, y))
        at = {k: chosen_first(mixed, k) for k in (0, 4)}
        oracle[str(alpha)] = {f"k={k}": lds_values(at[k], k, lambda p, m, y: refine_scores(p, m, y, prior))[0]
                              for k in (0, 4)}
        print("oracle mix", alpha, oracle[str(alpha)], flush=True)
    report["oracle prior mix (in-sample surrogate direction)"] = oracle
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
