"""Faithfulness metrics (ContextCite's): linear datamodeling score and top-k log-probability drop, and their
registration as the evaluation's built-in metrics (`registry.register_metric`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..stats import bootstrap_se, lds, predicted_effects, rankdata, spearman
from .registry import MethodScores, MetricColumn, register_metric

__all__ = ["bootstrap_se", "lds", "predicted_effects", "rankdata", "spearman"]  # kept where reports import them

TOP_K = (1, 3)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask that ablates the k highest-scored sources (ties broken by index)."""
    keep = torch.ones(len(scores), dtype=torch.bool)
    k = min(k, len(scores))
    if k > 0:
        keep[torch.argsort(-scores.double(), stable=True)[:k]] = False
    return keep


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
