"""Fit AT2's linear estimator on collected shards.

For a target with source features F ([sources, L*H]) and masks s ([masks, sources], +1 kept / -1 ablated),
the predicted label of mask m is sum_i s_mi * (w . F_i). The loss is the negative Pearson correlation between
predictions and the actual log-odds across the target's masks, averaged over targets. Adam, cosine schedule,
gradient clipping, held-out split by example, early stopping on held-out correlation; weights start uniform
(average attention) and are L1-normalised at the end.
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

from ..estimator import ScoreEstimator
from .data import CollectedExample

logger = logging.getLogger(__name__)


@dataclass
class TargetBatch:
    """Targets padded to the same number of sources: features [N, S, D], signs [N, M, S], labels [N, M]."""

    features: torch.Tensor
    signs: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.features.shape[0]


def to_targets(examples: Sequence[CollectedExample]) -> TargetBatch:
    """Flatten examples into targets; padding sources get zero features and so contribute nothing."""
    rows = [(ex.features[t], ex.masks, ex.labels[t]) for ex in examples for t in range(ex.features.shape[0])]
    if not rows:
        raise ValueError("no targets to train on")
    max_s = max(f.shape[0] for f, _, _ in rows)
    d = rows[0][0].shape[1]
    # the random masks come first; `collect --sources context` appends one all-documents-removed mask (for
    # groundedness), which the correlation objective over random masks leaves out
    m = min(mask.shape[0] for _, mask, _ in rows)
    feats = torch.zeros(len(rows), max_s, d)
    signs = torch.zeros(len(rows), m, max_s)
    labels = torch.zeros(len(rows), m)
    for i, (f, mask, y) in enumerate(rows):
        s = f.shape[0]
        feats[i, :s] = f
        signs[i, :, :s] = mask[:m].float() * 2 - 1
        labels[i] = y[:m]
    return TargetBatch(feats, signs, labels)


def pearson(pred: torch.Tensor, labels: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation of [N, M] tensors -> [N]."""
    p = pred - pred.mean(-1, keepdim=True)
    y = labels - labels.mean(-1, keepdim=True)
    return (p * y).sum(-1) / (p.norm(dim=-1) * y.norm(dim=-1) + eps)


def predictions(weights: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    scores = batch.features @ weights  # [N, S]
    return torch.einsum("nms,ns->nm", batch.signs, scores)


def informative(batch: TargetBatch, min_std: float = 1e-4) -> torch.Tensor:
    """Targets whose labels vary across masks (a constant label has no correlation to learn)."""
    return batch.labels.std(-1) > min_std


def correlation_loss(weights: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    return -pearson(predictions(weights, batch), batch.labels).mean()


def split_examples(
    examples: Sequence[CollectedExample], heldout_fraction: float, seed: int
) -> tuple[list[CollectedExample], list[CollectedExample]]:
    order = list(examples)
    random.Random(seed).shuffle(order)
    n_held = max(1, int(round(len(order) * heldout_fraction))) if len(order) > 1 else 0
    return order[n_held:], order[:n_held]


def calibrate(weights: torch.Tensor, batch: TargetBatch) -> dict[str, float]:
    """Least-squares scale from predictions to log-odds, and the score at which removing one source is
    predicted to move the answer's log-odds by 1 (the support threshold)."""
    pred = predictions(weights, batch)
    p = pred - pred.mean(-1, keepdim=True)
    y = batch.labels - batch.labels.mean(-1, keepdim=True)
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
) -> tuple[ScoreEstimator, dict[str, Any]]:
    """Train and return the estimator with its training report (held-out correlation per epoch).

    `more_examples`: further sets (e.g. multi-turn conversations beside single-turn examples), each split into
    training and held-out examples on its own with the same fraction and seed, so adding a set never moves
    another set's examples between the splits (held-out numbers measured on one set's split stay honest)."""
    torch.manual_seed(seed)
    train_ex, held_ex = split_examples(examples, heldout_fraction, seed)
    for group in more_examples:
        group_train, group_held = split_examples(group, heldout_fraction, seed)
        train_ex, held_ex = train_ex + group_train, held_ex + group_held
    train = to_targets(train_ex)
    keep = informative(train)
    train = TargetBatch(train.features[keep], train.signs[keep], train.labels[keep])
    held = to_targets(held_ex) if held_ex else train
    held_keep = informative(held)
    held = TargetBatch(held.features[held_keep], held.signs[held_keep], held.labels[held_keep])
    d = num_layers * num_heads
    if train.features.shape[-1] != d:
        raise ValueError(f"features have {train.features.shape[-1]} heads, expected {num_layers} x {num_heads}")

    weights = torch.nn.Parameter(torch.full((d,), 1.0 / d))
    optimizer = torch.optim.Adam([weights], lr=lr)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch))

    def held_corr(w: torch.Tensor) -> float:
        with torch.no_grad():
            return float(pearson(predictions(w, held), held.labels).mean())

    history = [{"epoch": 0, "heldout_correlation": held_corr(weights.detach())}]
    best = (history[0]["heldout_correlation"], weights.detach().clone(), 0)
    bar = tqdm(range(1, epochs + 1), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        order = torch.randperm(len(train))
        total = 0.0
        for start in range(0, len(train), batch_size):
            idx = order[start : start + batch_size]
            batch = TargetBatch(train.features[idx], train.signs[idx], train.labels[idx])
            loss = correlation_loss(weights, batch)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([weights], grad_clip)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
        corr = held_corr(weights.detach())
        history.append({"epoch": epoch, "train_loss": total / len(train), "heldout_correlation": corr})
        bar.set_postfix(loss=f"{total / len(train):.4f}", heldout=f"{corr:.4f}")
        if corr > best[0] + 1e-5:
            best = (corr, weights.detach().clone(), epoch)
        elif epoch - best[2] >= patience:
            logger.info("early stop at epoch %d (best %d, held-out r=%.4f)", epoch, best[2], best[0])
            break

    estimator = ScoreEstimator(best[1], num_layers, num_heads, model_id=model_id, trained=True)
    estimator.l1_normalize_()
    calibration = calibrate(estimator.weights.detach(), train)
    report = {
        "num_examples": len(train_ex) + len(held_ex),
        "num_train_examples": len(train_ex),
        "num_heldout_examples": len(held_ex),
        "num_train_targets": len(train),
        "num_heldout_targets": len(held),
        "best_epoch": best[2],
        "heldout_correlation": best[0],
        "initial_heldout_correlation": history[0]["heldout_correlation"],
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
