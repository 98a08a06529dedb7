"""Fit the refinement prior an estimator carries (`metadata["refinement"]`) on collected data.

`ablations=k` refines the estimator's scores with k measured ablations (at2_rag.attribution.refine): a Bayesian
linear surrogate whose prior is the scores, converted to nats by `prior_scale`, with strengths `prior_strength`
(how much the prior's effects weigh, in ablation passes) and `scale_strength` (how much its overall scale does).

- `prior_scale`: the median, over training targets, of the least-squares slope of a target's labels (log-odds
  under its random masks) on the estimator's predicted effects (the sum of the kept sources' scores).
- the strengths: the pair of `strengths` x `strengths` with the best mean LDS over the budgets `TUNING_BUDGETS`,
  on every `TUNING_STRIDE`-th training target: for a budget k, the k most informative of the target's random
  masks (as `choose_masks` picks them at run time) are the observed ablations and LDS (Spearman correlation of
  predicted and actual log-odds) is measured on the others.

Only the random masks of targets whose labels vary (standard deviation above 1e-4) are used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..attribution.refine import RefinementPrior, refine_scores
from ..evidence.ablations import most_informative
from ..stats import lds
from .data import CollectedExample, mask_kinds

STRENGTHS = (0.01, 0.03, 0.1, 0.3, 1.0)  # the grid of prior strengths and scale strengths
TUNING_BUDGETS = (2, 4, 8, 16)
TUNING_STRIDE = 4  # every 4th training target tunes the strengths (a quarter of the split: enough, and faster)

Target = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # features [S, L*H], masks [M, S], labels [M]


def refinement_targets(examples: Sequence[CollectedExample]) -> list[Target]:
    """Every target with labels that vary, with its random masks only."""
    out = []
    for ex in examples:
        kinds = mask_kinds(ex)
        random = [i for i, kind in enumerate(kinds) if kind == "random"]
        masks = ex.masks if len(random) == len(kinds) else ex.masks[random]
        for t in range(ex.features.shape[0]):
            labels = ex.labels[t] if len(random) == len(kinds) else ex.labels[t][random]
            if len(labels) > 1 and labels.std() > 1e-4:
                out.append((ex.features[t], masks, labels))
    return out


Method = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def mean_lds(rows: Sequence[Target], k: int, method: Method) -> tuple[float, float, int]:
    """Mean LDS (its standard error and count) over targets of `method(features, first k masks, their labels)`,
    measured on each target's other masks."""
    values = []
    for features, masks, labels in rows:
        held_masks, held_labels = masks[k:], labels[k:]
        if held_labels.std() < 1e-6:
            continue
        value = lds(method(features, masks[:k], labels[:k]).float(), held_masks, held_labels.float())
        if not math.isnan(value):
            values.append(value)
    v = torch.tensor(values, dtype=torch.double)
    return float(v.mean()), float(v.std() / math.sqrt(len(v))), len(v)


def chosen_first(rows: Sequence[Target], k: int) -> list[Target]:
    """The same targets with the k most informative masks of their pool moved first (the rest measure LDS)."""
    out = []
    for f, m, y in rows:
        order = most_informative(m, k)
        rest = [i for i in range(m.shape[0]) if i not in order]
        out.append((f, m[order + rest], y[order + rest]))
    return out


def median_slope(rows: Sequence[Target], weights: torch.Tensor) -> float:
    """Nats of log-odds per score unit: the median over targets of the least-squares slope."""
    slopes = []
    for f, m, y in rows:
        p = m.double() @ (f @ weights).double()
        p, yc = p - p.mean(), y.double() - y.double().mean()
        if float(p @ p) > 0:
            slopes.append(float(p @ yc) / float(p @ p))
    return float(torch.tensor(slopes).median())


def refined(weights: torch.Tensor, scale: float, strength: float, scale_strength: float) -> Method:
    """AT2+k with these prior settings, as a `mean_lds` method."""
    prior = RefinementPrior(scale=scale, strength=strength, scale_strength=scale_strength)
    return lambda f, m, y: refine_scores(f @ weights, m, y, prior)


def fit_refinement_prior(
    examples: Sequence[CollectedExample],
    weights: torch.Tensor,
    strengths: Sequence[float] = STRENGTHS,
    budgets: Sequence[int] = TUNING_BUDGETS,
    stride: int = TUNING_STRIDE,
) -> tuple[dict[str, Any] | None, str | None]:
    """`(settings, reason)`: `prior_scale`, `prior_strength`, `scale_strength` chosen on `examples` (the training
    split) for `weights`, or None and why not (no target whose labels vary, or too few masks for a budget)."""
    weights = weights.detach()
    rows = refinement_targets(examples)
    if not rows:
        return None, "no training target has labels that vary across its random masks"
    scale = median_slope(rows, weights)
    if not math.isfinite(scale) or scale <= 0:
        return None, f"the scores' median slope to the labels is {scale:g} (a prior scale must be above 0)"
    fewest = min(m.shape[0] for _, m, _ in rows)
    usable = [k for k in budgets if k + 2 <= fewest]
    tuning = {k: chosen_first(rows[::stride], k) for k in usable}
    if not usable or not any(tuning.values()):
        return None, f"targets have {fewest} random masks: too few to tune the prior at budgets {list(budgets)}"

    def score(pair: tuple[float, float]) -> float:
        return sum(mean_lds(tuning[k], k, refined(weights, scale, *pair))[0] for k in tuning)

    best = max(((s, c) for s in strengths for c in strengths), key=score)
    return {"prior_scale": scale, "prior_strength": best[0], "scale_strength": best[1]}, None
