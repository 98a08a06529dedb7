"""Baseline attribution methods that need extra forward passes: leave-one-out and a ContextCite-style
lasso surrogate fitted on random ablations (our own coordinate-descent lasso)."""

from __future__ import annotations

import torch


def leave_one_out_scores(full_label: torch.Tensor, single_ablation_labels: torch.Tensor) -> torch.Tensor:
    """Score of source i = label with everything kept minus label with only source i removed."""
    return full_label - single_ablation_labels


def lasso(
    design: torch.Tensor, target: torch.Tensor, alpha: float = 0.01, iterations: int = 500, tol: float = 1e-7
) -> tuple[torch.Tensor, float]:
    """Minimise 1/(2n) ||y - Xb - c||^2 + alpha ||b||_1 by cyclic coordinate descent. Returns (b, c)."""
    x = design.double()
    y = target.double()
    n, p = x.shape
    x_mean, y_mean = x.mean(0), y.mean()
    xc, yc = x - x_mean, y - y_mean
    col_sq = (xc * xc).sum(0) / n
    b = torch.zeros(p, dtype=torch.double)
    residual = yc.clone()
    for _ in range(iterations):
        largest = 0.0
        for j in range(p):
            if col_sq[j] == 0:
                continue
            old = b[j].item()
            rho = float(xc[:, j] @ residual) / n + col_sq[j].item() * old
            new = max(0.0, abs(rho) - alpha) * (1.0 if rho > 0 else -1.0) / col_sq[j].item()
            if new != old:
                residual -= xc[:, j] * (new - old)
                b[j] = new
                largest = max(largest, abs(new - old))
        if largest < tol:
            break
    intercept = float(y_mean - x_mean @ b)
    return b.float(), intercept


def surrogate_scores(masks: torch.Tensor, labels: torch.Tensor, alpha: float = 0.01) -> torch.Tensor:
    """ContextCite: fit a sparse linear model from keep-masks (0/1) to labels; its weights are the scores."""
    weights, _ = lasso(masks.float(), labels, alpha=alpha)
    return weights
