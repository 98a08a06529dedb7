"""The statistics evaluation and training both compute: rank correlation (the linear datamodeling score) and
bootstrap standard errors, in one place so a trained setting and its evaluation measure the same number."""

from __future__ import annotations

from collections.abc import Callable

import torch


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks starting at 1, ties get their average rank (as scipy.stats.rankdata)."""
    x = x.double().flatten()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.double)
    # average ties
    sorted_x = x[order]
    i = 0
    n = len(x)
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        if j > i:
            ranks[order[i : j + 1]] = (i + j + 2) / 2.0
        i = j + 1
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation; NaN when either side is constant (no ranking to compare)."""
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = ra.norm() * rb.norm()
    if denom == 0:
        return float("nan")
    return float((ra * rb).sum() / denom)


def predicted_effects(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Predicted effect of each mask under a linear attribution: the sum of the kept sources' scores."""
    return masks.double() @ scores.double()


def lds(scores: torch.Tensor, masks: torch.Tensor, actual: torch.Tensor) -> float:
    """Linear datamodeling score of one target: Spearman(predicted effect, actual log-odds) over masks."""
    return spearman(predicted_effects(scores, masks), actual)


def bootstrap_se(statistic: Callable[[torch.Tensor], float], n: int, reps: int = 500, seed: int = 0) -> float:
    """Standard error of `statistic(indices)` over `reps` resamples of n items with replacement (seeded, so
    reports are reproducible); resamples where it is undefined (NaN: one class missing) are left out."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor([statistic(torch.randint(0, n, (n,), generator=generator)) for _ in range(reps)])
    values = values[~values.isnan()]
    return float(values.std()) if len(values) else float("nan")
