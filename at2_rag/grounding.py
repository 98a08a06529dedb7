"""Groundedness: how much an answer sentence depends on the documents at all, in nats.

Ranking documents answers "which one?"; groundedness answers "any of them?". The estimator's scores are
linear effects, so removing every document is predicted to move a sentence's log-odds by the sum of its
document scores; a calibration fitted on ablations where every document was removed (collected data; see
bench/groundedness.py) turns that sum into nats: `grounded = scale * sum(scores) + offset`. A sentence is
supported when `grounded` reaches `threshold` (chosen on training data against "removing every document
lowers the sentence's log-probability by >= 1 nat").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

DEFAULT_THRESHOLD = 1.0  # nats: the definition of "depends on the documents" used in evaluation


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


@dataclass(frozen=True)
class GroundednessCalibration:
    """`grounded = scale * sum(document scores) + offset` (nats); supported when `grounded >= threshold`."""

    scale: float
    offset: float = 0.0
    threshold: float = DEFAULT_THRESHOLD
    calibrated: bool = False  # fitted on all-documents-removed ablations, not derived from the scores' scale

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], fallback_scale: float) -> "GroundednessCalibration":
        """The estimator's own calibration (`metadata["groundedness"]`), else the scores' scale in nats."""
        own = metadata.get("groundedness")
        if isinstance(own, Mapping) and _number(own.get("scale")) is not None:
            return cls(
                scale=float(own["scale"]),
                offset=_number(own.get("offset")) or 0.0,
                threshold=_number(own.get("threshold")) if _number(own.get("threshold")) is not None else DEFAULT_THRESHOLD,
                calibrated=True,
            )
        return cls(scale=fallback_scale)

    def grounded(self, document_scores: Sequence[float]) -> float:
        return self.scale * float(sum(document_scores)) + self.offset


def fit_groundedness(score_sums: torch.Tensor, drops: torch.Tensor) -> tuple[float, float]:
    """Least-squares `drops ~ scale * score_sums + offset` over targets (drops: log-odds with every document
    kept minus with every document removed)."""
    x = score_sums.double()
    y = drops.double()
    design = torch.stack([x, torch.ones_like(x)], dim=1)
    scale, offset = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1).tolist()
    return float(scale), float(offset)


def auroc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve (ties count half); nan when one class is missing."""
    pos, neg = scores[positives.bool()], scores[~positives.bool()]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos.unsqueeze(1) > neg.unsqueeze(0)).double().sum()
    ties = (pos.unsqueeze(1) == neg.unsqueeze(0)).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))
