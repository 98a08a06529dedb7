"""Groundedness: how much an answer sentence depends on the documents at all, in nats.

Ranking documents answers "which one?"; groundedness answers "any of them?". `grounded` predicts how much the
sentence's log-odds would drop if every document were removed. Two calibrations, both fitted on ablations where
every document was removed (collected data, single- and multi-turn; research/groundedness.py):

- a learned head (`document_weights`, `history_weights`, `head_offset`): one weight per attention head on the
  sentence's attention features summed over the documents, and one on those summed over the earlier turns,
  fitted by ridge regression to the log-odds drop, capped at `HEAD_TARGET_CAP` nats (the question is whether a
  sentence crosses 1 nat, and a few 30-nat drops would otherwise decide the fit). Which heads carry "reads the
  documents" differs from which heads say "this document, not that one", so this head is not the score
  estimator's.
- without a head, the estimator's scores: `scale * sum(document scores) + history_scale * sum(earlier turns'
  scores) + offset` (the scores are linear effects, so removing every document moves the log-odds by their sum;
  what an earlier turn already says does not need the documents).

A sentence is supported when `grounded` reaches `threshold`: 1 nat by default, the definition of "depends on the
documents" that evaluation measures against, not a number tuned to data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import EstimatorFormatError

DEFAULT_THRESHOLD = 1.0  # nats: the definition of "depends on the documents" used in evaluation
HEAD_TARGET_CAP = 5.0  # nats: the learned head's training targets are clipped to [-cap, cap]
HEAD_RIDGE = 1000.0  # on standardized features; chosen by grouped 5-fold cross-validation on the training split


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _head_weights(value: Any, name: str, num_features: int | None) -> torch.Tensor | None:
    """A head's weight list from untrusted metadata: absent, or exactly `num_features` finite numbers."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(_number(v) is not None for v in value):
        raise EstimatorFormatError(f"metadata.groundedness.{name} must be a list of finite numbers")
    if num_features is not None and len(value) != num_features:
        raise EstimatorFormatError(
            f"metadata.groundedness.{name} has {len(value)} weights, the estimator has {num_features} heads"
        )
    return torch.tensor(value, dtype=torch.float64)


@dataclasses.dataclass(frozen=True)
class GroundednessCalibration:
    """`grounded` in nats from the learned head when it has one (features), else from the scores (see the
    module docstring); supported when `grounded >= threshold`."""

    scale: float
    offset: float = 0.0
    history_scale: float = 0.0
    threshold: float = DEFAULT_THRESHOLD
    calibrated: bool = False  # fitted on all-documents-removed ablations, not derived from the scores' scale
    document_weights: torch.Tensor | None = dataclasses.field(default=None, compare=False)
    history_weights: torch.Tensor | None = dataclasses.field(default=None, compare=False)
    head_offset: float = 0.0

    @classmethod
    def from_metadata(
        cls, metadata: Mapping[str, Any], fallback_scale: float, num_features: int | None = None
    ) -> GroundednessCalibration:
        """The estimator's own calibration (`metadata["groundedness"]`), else the scores' scale in nats. A head
        whose weights are malformed or do not match the estimator's `num_features` heads is an
        `EstimatorFormatError` (estimator files are untrusted)."""
        own = metadata.get("groundedness")
        if isinstance(own, Mapping) and _number(own.get("scale")) is not None:
            threshold = _number(own.get("threshold"))
            return cls(
                scale=float(own["scale"]),
                offset=_number(own.get("offset")) or 0.0,
                history_scale=_number(own.get("history_scale")) or 0.0,
                threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
                calibrated=True,
                document_weights=_head_weights(own.get("document_weights"), "document_weights", num_features),
                history_weights=_head_weights(own.get("history_weights"), "history_weights", num_features),
                head_offset=_number(own.get("head_offset")) or 0.0,
            )
        return cls(scale=fallback_scale)

    def grounded(
        self,
        document_scores: Sequence[float],
        history_scores: Sequence[float] = (),
        document_features: torch.Tensor | None = None,
        history_features: torch.Tensor | None = None,
    ) -> float:
        """Nats. `*_features`: the target's attention features `[L*H]` summed over the documents / earlier turns
        (used by the head; a head without them falls back to the scores' calibration)."""
        if self.document_weights is not None and document_features is not None:
            value = float(document_features.double() @ self.document_weights) + self.head_offset
            if self.history_weights is not None and history_features is not None:
                value += float(history_features.double() @ self.history_weights)
            return value
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


def fit_groundedness_head(
    document_features: torch.Tensor,
    history_features: torch.Tensor,
    drops: torch.Tensor,
    ridge: float = HEAD_RIDGE,
    cap: float = HEAD_TARGET_CAP,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Ridge regression of the capped log-odds drops `[N]` on the summed document and earlier-turn features
    `[N, L*H]` (both standardized by the document features' spread, the intercept free). Returns
    `(document_weights, history_weights, offset)` on the raw features."""
    x = document_features.double()
    h = history_features.double()
    mean, spread = x.mean(0), x.std(0).clamp_min(1e-9)
    design = torch.cat([(x - mean) / spread, (h - mean) / spread, torch.ones(len(x), 1, dtype=torch.double)], 1)
    penalty = torch.eye(design.shape[1], dtype=torch.double) * ridge
    penalty[-1, -1] = 0.0
    target = drops.double().clamp(-cap, cap)
    solution = torch.linalg.solve(design.T @ design + penalty, design.T @ target)
    f = x.shape[1]
    doc_w, hist_w = solution[:f] / spread, solution[f : 2 * f] / spread
    offset = float(solution[-1] - (mean * doc_w).sum() - (mean * hist_w).sum())
    return doc_w, hist_w, offset


def auroc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve (ties count half); nan when one class is missing."""
    pos, neg = scores[positives.bool()], scores[~positives.bool()]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos.unsqueeze(1) > neg.unsqueeze(0)).double().sum()
    ties = (pos.unsqueeze(1) == neg.unsqueeze(0)).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))
