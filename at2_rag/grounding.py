"""Groundedness: how much an answer sentence depends on the documents at all, in nats.

Ranking documents answers "which one?"; groundedness answers "any of them?". The estimator's scores are
linear effects, so removing every document is predicted to move a sentence's log-odds by the sum of its
document scores; what an earlier turn already says does not need the documents, so the earlier turns' scores
count too. A calibration fitted on ablations where every document was removed (collected data, single- and
multi-turn; see bench/groundedness.py) turns them into nats:
`grounded = scale * sum(document scores) + history_scale * sum(earlier turns' scores) + offset`. A sentence is
supported when `grounded` reaches `threshold`: 1 nat by default, the definition of "depends on the
documents" that evaluation measures against, not a number tuned to data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_THRESHOLD = 1.0  # nats: the definition of "depends on the documents" used in evaluation


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


@dataclass(frozen=True)
class GroundednessCalibration:
    """`grounded = scale * sum(document scores) + history_scale * sum(earlier turns' scores) + offset` (nats);
    supported when `grounded >= threshold`."""

    scale: float
    offset: float = 0.0
    history_scale: float = 0.0
    threshold: float = DEFAULT_THRESHOLD
    calibrated: bool = False  # fitted on all-documents-removed ablations, not derived from the scores' scale

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], fallback_scale: float) -> GroundednessCalibration:
        """The estimator's own calibration (`metadata["groundedness"]`), else the scores' scale in nats."""
        own = metadata.get("groundedness")
        if isinstance(own, Mapping) and _number(own.get("scale")) is not None:
            threshold = _number(own.get("threshold"))
            return cls(
                scale=float(own["scale"]),
                offset=_number(own.get("offset")) or 0.0,
                history_scale=_number(own.get("history_scale")) or 0.0,
                threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
                calibrated=True,
            )
        return cls(scale=fallback_scale)

    def grounded(self, document_scores: Sequence[float], history_scores: Sequence[float] = ()) -> float:
        return self.scale * float(sum(document_scores)) + self.history_scale * float(sum(history_scores)) + self.offset


def fit_groundedness(
    document_sums: torch.Tensor, drops: torch.Tensor, history_sums: torch.Tensor | None = None
) -> tuple[float, float, float]:
    """Least-squares `drops ~ scale * document_sums + history_scale * history_sums + offset` over targets
    (drops: log-odds with every document kept minus with every document removed). Returns
    `(scale, offset, history_scale)`; history_scale is 0 without history sums."""
    x = document_sums.double()
    columns = [x, torch.ones_like(x)]
    if history_sums is not None:
        columns.append(history_sums.double())
    design = torch.stack(columns, dim=1)
    solution = torch.linalg.lstsq(design, drops.double().unsqueeze(1)).solution.squeeze(1).tolist()
    return float(solution[0]), float(solution[1]), float(solution[2]) if history_sums is not None else 0.0


def auroc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve (ties count half); nan when one class is missing."""
    pos, neg = scores[positives.bool()], scores[~positives.bool()]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos.unsqueeze(1) > neg.unsqueeze(0)).double().sum()
    ties = (pos.unsqueeze(1) == neg.unsqueeze(0)).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))
