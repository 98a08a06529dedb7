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

import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidInputError

logger = logging.getLogger(__name__)

# Chosen on the shipped estimator's training split (510 examples; bench/refinement.py), not on held-out data;
# an estimator's own `metadata["refinement"]` overrides them.
DEFAULT_PRIOR_STRENGTH = 0.3
DEFAULT_SCALE_STRENGTH = 0.03
MAX_EXACT_SOURCES = 20  # above this, 2**n distinct masks is never a cap worth computing


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


def check_ablations(ablations: Any) -> int:
    """`ablations` must be a non-negative integer (bool is refused: `True` is not a number of passes)."""
    if isinstance(ablations, bool) or not isinstance(ablations, int):
        raise InvalidInputError(f"ablations must be a non-negative integer, got {ablations!r}")
    if ablations < 0:
        raise InvalidInputError(f"ablations must be a non-negative integer, got {ablations}")
    return ablations


def distinct_mask_count(num_sources: int) -> int:
    return 2**num_sources if num_sources <= MAX_EXACT_SOURCES else 2**MAX_EXACT_SOURCES


def _random_distinct(num_sources: int, count: int, generator: torch.Generator) -> torch.Tensor:
    seen: set[bytes] = set()
    rows: list[torch.Tensor] = []
    while len(rows) < count:
        row = torch.rand(num_sources, generator=generator) < 0.5
        key = row.numpy().tobytes()
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return torch.stack(rows) if rows else torch.zeros(0, num_sources, dtype=torch.bool)


def most_informative(pool: torch.Tensor, k: int, ridge: float = DEFAULT_PRIOR_STRENGTH) -> list[int]:
    """Greedy D-optimal choice of k masks from `pool`: each adds the most information about the effects (with
    an intercept) given those already chosen, i.e. runs where the posterior is least certain. Label-free, so
    it is a design decided before any pass is run."""
    design = torch.cat([torch.ones(pool.shape[0], 1), pool.float()], dim=1).double()
    information = torch.eye(design.shape[1], dtype=torch.double) * ridge
    chosen: list[int] = []
    for _ in range(min(k, pool.shape[0])):
        gain = torch.einsum("mi,ij,mj->m", design, torch.linalg.inv(information), design)
        gain[chosen] = -1.0
        best = int(gain.argmax())
        chosen.append(best)
        information += torch.outer(design[best], design[best])
    return chosen


def choose_masks(num_sources: int, k: int, seed_text: str = "", pool_size: int = 64) -> torch.Tensor:
    """`[k', num_sources]` distinct keep-masks, k' = min(k, 2^n): the k most informative (`most_informative`)
    of a pool of random masks (each source kept with probability 1/2). bench/refinement.py compares this with
    the first k random masks: it lifts LDS at every small k (docs/benchmarks.md).

    Seeded by `seed_text` (the prompt and answer), so the same request gets the same masks.
    """
    limit = distinct_mask_count(num_sources)
    if k > limit:
        logger.info("ablations=%d capped at %d: %d sources have only %d distinct masks", k, limit, num_sources, limit)
        k = limit
    seed = int.from_bytes(hashlib.sha256(seed_text.encode("utf-8", "surrogatepass")).digest()[:8], "little") >> 1
    generator = torch.Generator().manual_seed(seed)
    if k == limit and num_sources <= MAX_EXACT_SOURCES:  # every mask, in a random order
        every = torch.arange(limit).unsqueeze(1).bitwise_and(1 << torch.arange(num_sources)).ne(0)
        return every[torch.randperm(limit, generator=generator)]
    pool = _random_distinct(num_sources, min(limit, max(pool_size, 2 * k)), generator)
    return pool[most_informative(pool, k)]


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
