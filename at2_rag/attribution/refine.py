"""Refine AT2 scores with k ablation passes: the zero-pass AT2 prediction is the prior, ablations the evidence.

The labels of ablation masks are nearly linear in which sources are kept, so after k passes a linear
surrogate `y = b0 + x . beta` (x = keep bits) is fitted by Bayesian linear regression whose prior mean is the
calibrated AT2 prediction. The prior says *which* sources matter and in what proportion; its scale (nats per
score unit) varies from answer to answer, so it is fitted too, shrunk towards the estimator's calibration:

    beta = g * s + d,   g ~ N(scale, sigma^2 / (scale_strength * |s|^2)),   d ~ N(0, sigma^2 / strength)

k = 0 returns the AT2 scores unchanged; as k grows the data dominate and beta tends to the least-squares
ablation surrogate on the same masks. Refined scores are returned in AT2 units (beta / scale), so thresholds
and comparisons keep their meaning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Chosen on the shipped estimator's training split (510 examples; research/refinement.py), not on held-out data;
# an estimator's own `metadata["refinement"]` overrides them.
DEFAULT_PRIOR_STRENGTH = 0.3
DEFAULT_SCALE_STRENGTH = 0.03


@dataclass(frozen=True)
class RefinementPrior:
    """How much to trust the AT2 prior: `scale` converts scores to nats of log-odds; strengths are in units
    of ablation passes (a strength of 1 weighs like one observed mask)."""

    scale: float
    strength: float = DEFAULT_PRIOR_STRENGTH
    scale_strength: float = DEFAULT_SCALE_STRENGTH

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> RefinementPrior:
        """The estimator's own refinement settings, else its calibration (`score_to_log_odds`), else 1."""
        refinement = metadata.get("refinement")
        own: Mapping[str, Any] = refinement if isinstance(refinement, Mapping) else {}
        scale = own.get("prior_scale")
        if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            calibrated = metadata.get("score_to_log_odds")
            # calibration fits +-1 signs; keep bits are (sign + 1) / 2, so one source's effect is twice the scale
            if isinstance(calibrated, (int, float)) and math.isfinite(calibrated) and calibrated > 0:
                scale = 2.0 * float(calibrated)
            else:
                scale = 1.0
        return cls(
            scale=float(scale),
            strength=float(own.get("prior_strength", DEFAULT_PRIOR_STRENGTH)),
            scale_strength=float(own.get("scale_strength", DEFAULT_SCALE_STRENGTH)),
        )


def refine_scores(
    prior_scores: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, prior: RefinementPrior
) -> torch.Tensor:
    """Posterior-mean source effects given `labels[k]` (log-odds) observed under `masks[k, S]` (True = kept).

    Returned in the prior's units (divided by `prior.scale`); `prior_scores` unchanged when k = 0.
    """
    if masks.shape[0] == 0:
        return prior_scores.clone()
    s = prior_scores.detach().double()
    x = masks.double()
    y = labels.double()
    k, n = x.shape
    design = torch.cat([torch.ones(k, 1, dtype=torch.double), (x @ s).unsqueeze(1), x], dim=1)
    penalty = torch.zeros(n + 2, n + 2, dtype=torch.double)
    norm = float(s @ s) or 1.0
    penalty[0, 0] = 1e-9  # intercept: free
    penalty[1, 1] = prior.scale_strength * norm
    penalty[2:, 2:] = prior.strength * torch.eye(n, dtype=torch.double)  # residual effects, in nats
    rhs = design.T @ y
    rhs[1] += prior.scale_strength * norm * prior.scale
    solution = torch.linalg.lstsq(design.T @ design + penalty, rhs.unsqueeze(1)).solution.squeeze(1)
    beta = solution[1] * s + solution[2:]
    return (beta / prior.scale).to(prior_scores.dtype)
