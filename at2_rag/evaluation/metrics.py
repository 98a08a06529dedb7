"""Faithfulness metrics (ContextCite's): linear datamodeling score and top-k log-probability drop, and their
registration as the evaluation's built-in metrics (`registry.register_metric`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .registry import MethodScores, MetricColumn, register_metric

TOP_K = (1, 3)


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


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask that ablates the k highest-scored sources (ties broken by index)."""
    keep = torch.ones(len(scores), dtype=torch.bool)
    k = min(k, len(scores))
    if k > 0:
        keep[torch.argsort(-scores.double(), stable=True)[:k]] = False
    return keep


def bootstrap_se(statistic: Callable[[torch.Tensor], float], n: int, reps: int = 500, seed: int = 0) -> float:
    """Standard error of `statistic(indices)` over `reps` resamples of n items with replacement (seeded, so
    reports are reproducible); resamples where it is undefined (NaN: one class missing) are left out."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor([statistic(torch.randint(0, n, (n,), generator=generator)) for _ in range(reps)])
    values = values[~values.isnan()]
    return float(values.std()) if len(values) else float("nan")


def mean_se(values: Sequence[float]) -> dict[str, float]:
    """Mean, its standard error and the count, as reports record them (NaN mean with no values, NaN error with
    one)."""
    v = torch.tensor([float(x) for x in values], dtype=torch.double)
    mean = float(v.mean()) if len(v) else float("nan")
    se = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"mean": mean, "se": se, "n": len(v)}


def nanmean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values (NaN when there are none)."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


@register_metric(
    "lds",
    MetricColumn("lds", "LDS, all answer sentences", digits=3),
    MetricColumn("lds_dependent", "LDS, document-dependent sentences", digits=3),
)
def lds_metric(m: MethodScores) -> dict[str, float]:
    """Mean LDS over the answer sentences, and over the document-dependent ones alone (a sentence the documents
    barely move has a near-constant label whose ranking is noise)."""
    values = [lds(m.scores[i], m.lds_masks, y) for i, y in enumerate(m.lds_log_odds)]
    dependent = [v for v, dep in zip(values, m.dependent, strict=True) if dep]
    return {"lds": nanmean(values), "lds_dependent": nanmean(dependent)}


@register_metric("top_k_drop", *(MetricColumn(f"top{k}_drop", f"top-{k} log-prob drop", digits=2) for k in TOP_K))
def top_k_drop_metric(m: MethodScores) -> dict[str, float]:
    """Drop in the whole answer's log-probability when the k highest-scored sources are removed."""
    whole = m.scores[-1]
    full, *dropped = m.answer_log_probs([torch.ones(m.num_sources, dtype=torch.bool)]
                                        + [top_k_mask(whole, k) for k in TOP_K])
    return {f"top{k}_drop": full - d for k, d in zip(TOP_K, dropped, strict=True)}
