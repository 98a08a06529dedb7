"""The evaluation's figures: each method's metrics with standard errors, and the budget curve (AT2 + k ablations
against ContextCite-k on the same masks)."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .ablation_cache import SURROGATE_SIZES
from .registry import MetricColumn, columns

logger = logging.getLogger(__name__)


def plot_summary(
    summary: dict[str, Any], path: str | os.PathLike[str], title: str = "",
    report_columns: Sequence[MetricColumn] | None = None,
) -> Path:
    """One panel per plotted metric column, one bar per method (with its standard error and extra passes)."""
    from ..plotting import pyplot, save_figure

    plt = pyplot()
    names = [n for n in summary if not _is_budget_method(n)]  # those are drawn by plot_budget_curve
    panels = [c for c in (report_columns or columns()) if c.plot and any(c.key in summary[n] for n in names)]
    if not panels:
        raise ValueError("nothing to plot: the summary has none of the metric columns")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.8), squeeze=False)
    for ax, column in zip(axes[0], panels, strict=True):
        values = [summary[n].get(column.key, float("nan")) for n in names]
        errs = [summary[n].get(column.key + "_sem", 0) for n in names]
        errs = [0 if (e is None or math.isnan(e)) else e for e in errs]
        ax.bar(range(len(names)), values, yerr=errs, color=["#d62728" if n == "at2" else "#7f7f7f" for n in names])
        ticks = [f"{n}\n({summary[n].get('extra_forward_passes', float('nan')):.0f} passes)" for n in names]
        ax.set_xticks(range(len(names)), ticks, fontsize=7, rotation=30, ha="right")
        ax.set_title(column.label, fontsize=9)
    fig.suptitle(title or "Attribution faithfulness on held-out examples", fontsize=10)
    return save_figure(fig, path)


def _is_budget_method(name: str) -> bool:
    """`at2+4`, or ContextCite on a budget's chosen masks (not one of the random-mask surrogate sizes)."""
    fitted = re.fullmatch(r"contextcite_(\d+)", name)
    return "+" in name or (fitted is not None and int(fitted.group(1)) not in SURROGATE_SIZES)


def budget_curves(summary: dict[str, Any], key: str) -> dict[str, list[tuple[float, float, float]]]:
    """Per method family, `(extra forward passes, mean, standard error)` of column `key`, by passes: AT2 from 0
    passes through AT2+k, ContextCite-k on the same chosen masks, ContextCite on random masks (the surrogate
    sizes, a family of its own: another design, not more of the same curve), and the single points."""
    curves: dict[str, list[tuple[float, float, float]]] = {}
    for name, values in summary.items():
        if key not in values:
            continue
        family = name.split("+", 1)[0] if "+" in name else name
        if name.startswith("contextcite_"):  # chosen masks at a budget, or a surrogate size's random masks
            family = "contextcite" if _is_budget_method(name) else "contextcite_random"
        sem = values.get(key + "_sem", float("nan"))
        point = (float(values.get("extra_forward_passes", float("nan"))), float(values[key]),
                 0.0 if sem is None or math.isnan(sem) else float(sem))
        curves.setdefault(family, []).append(point)
    return {family: sorted(points) for family, points in curves.items()}


CURVE_LABELS = {"at2": "AT2 + k ablations", "contextcite": "ContextCite-k (same masks)",
                "contextcite_random": "ContextCite-k (random masks)", "leave_one_out": "leave-one-out",
                "average_attention": "average attention + k ablations"}
CURVE_COLORS = {"at2": "#d62728", "contextcite": "#1f77b4", "contextcite_random": "#17becf",
                "leave_one_out": "#ff7f0e", "average_attention": "#7f7f7f"}
CURVE_STYLES = {"contextcite_random": "s--"}


def plot_budget_curve(
    summary: dict[str, Any], path: str | os.PathLike[str], title: str = "", keys: Sequence[str] = ("lds", "top1_drop")
) -> Path:
    """Fidelity at a budget: each of `keys` (LDS, top-1 drop) against the extra forward passes a method pays."""
    from ..plotting import pyplot, save_figure

    plt = pyplot()
    labels = {c.key: c.label for c in columns()}
    panels = [k for k in keys if any(k in v for v in summary.values())]
    if not panels:
        raise ValueError(f"nothing to plot: the summary has none of {list(keys)}")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.9), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        for family, points in budget_curves(summary, key).items():
            xs, ys, errs = zip(*points, strict=True)
            style = CURVE_STYLES.get(family, "o-") if len(points) > 1 else "D"
            color = CURVE_COLORS.get(family)
            ax.errorbar(xs, ys, yerr=errs, fmt=style, capsize=3, ms=5, color=color,
                        label=CURVE_LABELS.get(family, family))
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("extra forward passes per answer")
        ax.set_title(labels.get(key, key), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title or "Fidelity at a budget on held-out examples", fontsize=10)
    return save_figure(fig, path)
