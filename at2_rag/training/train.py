"""Fit AT2's linear estimator on collected shards.

For a target with source features F ([sources, L*H]) and masks s ([masks, sources], +1 kept / -1 ablated),
the predicted label of mask m is sum_i s_mi * (w . F_i). The loss is the negative Pearson correlation between
predictions and the actual log-odds across the target's random masks, averaged over targets; a target that also
has leave-one-out masks adds its correlation over those. Adam, cosine schedule, gradient clipping, held-out split
by example, early stopping on the held-out objective; weights start uniform (average attention) and are
L1-normalised at the end.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..attribution.estimator import ScoreEstimator
from ..errors import InvalidInputError
from .data import CollectedExample, mask_kinds

logger = logging.getLogger(__name__)


@dataclass
class TargetBatch:
    """Targets padded to the same number of sources and masks: features [N, S, D], signs [N, M, S], labels [N, M];
    `random` and `leave_one_out` [N, M] say which masks are of each kind (False: padding, or another kind)."""

    features: torch.Tensor
    signs: torch.Tensor
    labels: torch.Tensor
    random: torch.Tensor
    leave_one_out: torch.Tensor

    @classmethod
    def of_random_masks(cls, features: torch.Tensor, signs: torch.Tensor, labels: torch.Tensor) -> TargetBatch:
        return cls(features, signs, labels, torch.ones_like(labels, dtype=torch.bool),
                   torch.zeros_like(labels, dtype=torch.bool))

    def __len__(self) -> int:
        return self.features.shape[0]

    def select(self, index: torch.Tensor) -> TargetBatch:
        return TargetBatch(self.features[index], self.signs[index], self.labels[index], self.random[index],
                           self.leave_one_out[index])


def to_targets(examples: Sequence[CollectedExample]) -> TargetBatch:
    """Flatten examples into targets; padding sources get zero features and so contribute nothing. The random
    masks and the leave-one-out masks are kept (each kind is its own correlation term); the all-documents-removed
    mask of `collect --sources context` is left out (groundedness is calibrated on it, not trained)."""
    rows = []
    for ex in examples:
        kinds = mask_kinds(ex)
        used = [i for i, kind in enumerate(kinds) if kind in ("random", "leave_one_out")]
        is_loo = torch.tensor([kinds[i] == "leave_one_out" for i in used], dtype=torch.bool)
        for t in range(ex.features.shape[0]):
            rows.append((ex.features[t], ex.masks[used], ex.labels[t][used], is_loo))
    if not rows:
        raise ValueError("no targets to train on")
    max_s = max(f.shape[0] for f, _, _, _ in rows)
    max_m = max(mask.shape[0] for _, mask, _, _ in rows)
    d = rows[0][0].shape[1]
    feats = torch.zeros(len(rows), max_s, d)
    signs = torch.zeros(len(rows), max_m, max_s)
    labels = torch.zeros(len(rows), max_m)
    random_masks = torch.zeros(len(rows), max_m, dtype=torch.bool)
    loo_masks = torch.zeros(len(rows), max_m, dtype=torch.bool)
    for i, (f, mask, y, is_loo) in enumerate(rows):
        s, m = f.shape[0], mask.shape[0]
        feats[i, :s] = f
        signs[i, :m, :s] = mask.float() * 2 - 1
        labels[i, :m] = y
        random_masks[i, :m] = ~is_loo
        loo_masks[i, :m] = is_loo
    return TargetBatch(feats, signs, labels, random_masks, loo_masks)


def pearson(pred: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None,
            eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation of [N, M] tensors -> [N], over the masks where `weight` ([N, M] bool) is set."""
    if weight is None:
        weight = torch.ones_like(pred, dtype=torch.bool)
    w = weight.to(pred.dtype)
    count = w.sum(-1, keepdim=True).clamp_min(1.0)
    p = (pred - (pred * w).sum(-1, keepdim=True) / count) * w
    y = (labels - (labels * w).sum(-1, keepdim=True) / count) * w
    return (p * y).sum(-1) / (p.norm(dim=-1) * y.norm(dim=-1) + eps)


def predictions(weights: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    scores = batch.features @ weights  # [N, S]
    return torch.einsum("nms,ns->nm", batch.signs, scores)


def _spread(labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    w = weight.to(labels.dtype)
    count = w.sum(-1).clamp_min(1.0)
    mean = (labels * w).sum(-1) / count
    return (((labels - mean[:, None]) ** 2 * w).sum(-1) / (count - 1).clamp_min(1.0)).sqrt()


def informative(batch: TargetBatch, min_std: float = 1e-4) -> torch.Tensor:
    """Targets whose labels vary across the random masks (a constant label has no correlation to learn)."""
    return _spread(batch.labels, batch.random) > min_std


# a target's leave-one-out correlation counts this much beside its random-mask correlation
LEAVE_ONE_OUT_WEIGHT = 1.0


def correlation_loss(weights: torch.Tensor, batch: TargetBatch, loo_weight: float = LEAVE_ONE_OUT_WEIGHT
                     ) -> torch.Tensor:
    """Negative correlation over the random masks, plus `loo_weight` times that over the leave-one-out masks for
    the targets that have them (at least three, with labels that vary): the random masks teach the joint effect
    of removing many sources, the leave-one-out ones which single source matters most, which differ where
    sources repeat each other."""
    pred = predictions(weights, batch)
    loss = -pearson(pred, batch.labels, batch.random)
    has_loo = (batch.leave_one_out.sum(-1) >= 3) & (_spread(batch.labels, batch.leave_one_out) > 1e-4)
    if loo_weight and bool(has_loo.any()):
        loss = loss - loo_weight * pearson(pred, batch.labels, batch.leave_one_out) * has_loo
    return loss.mean()


def split_examples(
    examples: Sequence[CollectedExample], heldout_fraction: float, seed: int
) -> tuple[list[CollectedExample], list[CollectedExample]]:
    """Shuffled by `seed`: a fraction above 0 holds out at least one example (none of a one-example set, which
    would leave nothing to train on); a fraction of 0 holds out none."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise InvalidInputError(f"heldout_fraction must be at least 0 and below 1, got {heldout_fraction}")
    order = list(examples)
    random.Random(seed).shuffle(order)
    n_held = max(1, int(round(len(order) * heldout_fraction))) if len(order) > 1 and heldout_fraction > 0 else 0
    return order[n_held:], order[:n_held]


def calibrate(weights: torch.Tensor, batch: TargetBatch) -> dict[str, float]:
    """Least-squares scale from predictions to log-odds, and the score at which removing one source is
    predicted to move the answer's log-odds by 1 (the support threshold)."""
    pred = predictions(weights, batch)
    w = batch.random.to(pred.dtype)  # the random masks only: the scale of the effect of removing many sources
    count = w.sum(-1, keepdim=True).clamp_min(1.0)
    p = (pred - (pred * w).sum(-1, keepdim=True) / count) * w
    y = (batch.labels - (batch.labels * w).sum(-1, keepdim=True) / count) * w
    scale = float((p * y).sum() / (p * p).sum().clamp_min(1e-12))
    # flipping one source from kept (+1) to ablated (-1) changes the prediction by 2 * score
    threshold = 1.0 / (2.0 * scale) if scale > 0 else float("inf")
    return {"score_to_log_odds": scale, "support_threshold": threshold}


def train_estimator(
    examples: Sequence[CollectedExample],
    num_layers: int,
    num_heads: int,
    model_id: str | None = None,
    epochs: int = 200,
    lr: float = 1e-3,
    batch_size: int = 64,
    heldout_fraction: float = 0.15,
    patience: int = 20,
    grad_clip: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    more_examples: Sequence[Sequence[CollectedExample]] = (),
    loo_weight: float = LEAVE_ONE_OUT_WEIGHT,
) -> tuple[ScoreEstimator, dict[str, Any]]:
    """Train and return the estimator with its training report (held-out correlation per epoch).

    `more_examples`: further sets (e.g. multi-turn conversations beside single-turn examples), each split into
    training and held-out examples on its own with the same fraction and seed, so adding a set never moves
    another set's examples between the splits (held-out numbers measured on one set's split stay honest).
    Examples with leave-one-out masks (`merge_collected`) add `loo_weight` times their correlation to the
    objective; early stopping follows the same objective on the held-out split. Without held-out examples
    (`heldout_fraction=0`, or sets of one example) every epoch runs, the last weights are kept and the report's
    held-out numbers are None: training data never stands in for held-out data."""
    torch.manual_seed(seed)
    train_ex, held_ex = split_examples(examples, heldout_fraction, seed)
    for group in more_examples:
        group_train, group_held = split_examples(group, heldout_fraction, seed)
        train_ex, held_ex = train_ex + group_train, held_ex + group_held
    train = to_targets(train_ex)
    keep = informative(train)
    train = train.select(keep)
    if len(train) == 0:
        raise InvalidInputError("no training target has labels that vary across its random masks: there is nothing "
                                "to learn (collect more examples)")
    held = to_targets(held_ex) if held_ex else None
    if held is None:
        logger.warning("no held-out examples (heldout_fraction=%s): no early stopping, all %d epochs run and the "
                       "last weights are kept", heldout_fraction, epochs)
    else:
        held = held.select(informative(held))
        if len(held) == 0:  # the held-out objective would be NaN, and the starting weights saved as trained
            raise InvalidInputError(f"none of the {len(held_ex)} held-out examples has a target whose labels vary "
                                    "across its random masks, so early stopping has nothing to follow: collect more "
                                    "examples or raise heldout_fraction")
    d = num_layers * num_heads
    if train.features.shape[-1] != d:
        raise ValueError(f"features have {train.features.shape[-1]} heads, expected {num_layers} x {num_heads}")

    weights = torch.nn.Parameter(torch.full((d,), 1.0 / d))
    optimizer = torch.optim.Adam([weights], lr=lr)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch))

    def held_corr(w: torch.Tensor) -> float | None:
        if held is None:
            return None
        with torch.no_grad():
            return float(pearson(predictions(w, held), held.labels, held.random).mean())

    def held_objective(w: torch.Tensor) -> float:
        if held is None:  # nothing to stop on: every epoch is the best so far
            return math.inf
        with torch.no_grad():
            return -float(correlation_loss(w, held, loo_weight))

    def held_loo_corr(w: torch.Tensor) -> float | None:
        if held is None:
            return None
        rows = held.leave_one_out.sum(-1) >= 3
        if not bool(rows.any()):
            return None
        with torch.no_grad():
            sub = held.select(rows)
            return float(pearson(predictions(w, sub), sub.labels, sub.leave_one_out).mean())

    history = [{"epoch": 0, "heldout_correlation": held_corr(weights.detach())}]
    best = (held_objective(weights.detach()), weights.detach().clone(), 0)
    bar = tqdm(range(1, epochs + 1), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        order = torch.randperm(len(train))
        total = 0.0
        for start in range(0, len(train), batch_size):
            idx = order[start : start + batch_size]
            loss = correlation_loss(weights, train.select(idx), loo_weight)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([weights], grad_clip)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
        corr, objective = held_corr(weights.detach()), held_objective(weights.detach())
        history.append({"epoch": epoch, "train_loss": total / len(train), "heldout_correlation": corr})
        bar.set_postfix(loss=f"{total / len(train):.4f}", **({} if corr is None else {"heldout": f"{corr:.4f}"}))
        if held is None or objective > best[0] + 1e-5:
            best = (objective, weights.detach().clone(), epoch)
        elif epoch - best[2] >= patience:
            logger.info("early stop at epoch %d (best %d, held-out objective %.4f)", epoch, best[2], best[0])
            break

    estimator = ScoreEstimator(best[1], num_layers, num_heads, model_id=model_id, trained=True)
    estimator.l1_normalize_()
    calibration = calibrate(estimator.weights.detach(), train)
    loo_corr = held_loo_corr(best[1])
    report = {
        "num_examples": len(train_ex) + len(held_ex),
        "num_train_examples": len(train_ex),
        "num_heldout_examples": len(held_ex),
        "num_train_targets": len(train),
        "num_heldout_targets": 0 if held is None else len(held),
        "early_stopping": held is not None,
        "best_epoch": best[2],
        "heldout_correlation": history[best[2]]["heldout_correlation"],
        "initial_heldout_correlation": history[0]["heldout_correlation"],
        **({"leave_one_out_weight": loo_weight, "heldout_leave_one_out_correlation": loo_corr}
           if loo_corr is not None else {}),
        "epochs_run": history[-1]["epoch"],
        "lr": lr,
        "batch_size": batch_size,
        **calibration,
        "heldout_example_ids": [ex.id for ex in held_ex],
        "history": history,
    }
    estimator.metadata.update(report_summary(report))
    return estimator, report


def report_summary(report: dict[str, Any]) -> dict[str, Any]:
    """A training report without its long lists (per-epoch history, held-out example ids): what the estimator's
    config keeps and the console shows; training_report.json keeps everything."""
    return {k: v for k, v in report.items() if k not in ("history", "heldout_example_ids")}
