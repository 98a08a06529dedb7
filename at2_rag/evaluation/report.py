"""Evaluate attribution methods on held-out examples: LDS, top-k log-probability drop and cost.

Methods: the trained estimator (AT2), average attention (uniform weights), leave-one-out (n + 1 passes) and
ContextCite-style lasso surrogates fitted on N random ablations. LDS uses answer sentences as targets and
fresh random masks; top-k drop uses the whole answer as target.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from ..attributor import Attributor
from ..estimator import ScoreEstimator
from ..features import answer_targets, target_features
from ..training.ablation import (
    ablated_answer_logit_probs,
    random_masks,
    target_log_odds,
    target_log_prob,
)
from ..training.collect import example_seed, source_layout
from ..training.data import read_examples
from .baselines import leave_one_out_scores, surrogate_scores
from .metrics import lds, top_k_mask

logger = logging.getLogger(__name__)

LDS_MASKS = 32
SURROGATE_SIZES = (32, 64)
TOP_K = (1, 3)


def _labels(attributor: Attributor, ids: list[int], answer_len: int, spans: Any, masks: torch.Tensor, batch: int) -> torch.Tensor:
    with attributor.lock:
        return ablated_answer_logit_probs(attributor.model, ids, answer_len, spans, masks, batch)


def evaluate_example(
    attributor: Attributor,
    estimators: dict[str, ScoreEstimator],
    example: Any,
    seed: int = 1,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    surrogate_sizes: Sequence[int] = SURROGATE_SIZES,
) -> dict[str, Any] | None:
    """Per-method LDS (mean over target sentences), top-k drops and cost for one example."""
    t0 = time.perf_counter()
    run = attributor.generate_run(example.query, example.documents, example.history, max_new_tokens=max_new_tokens)
    gen_seconds = time.perf_counter() - t0
    targets = answer_targets(run.answer)
    spans, columns, _ = source_layout(run, "documents")
    n = len(spans)
    if not targets or n == 0:
        return None
    ids = run.prompt.input_ids + run.answer.token_ids
    a_len = len(run.answer.token_ids)
    all_rows = [r for _, rows in targets for r in rows]
    gen = torch.Generator().manual_seed(example_seed(seed, example.id))

    # ground truth for LDS: fresh random masks (row 0 = nothing ablated)
    lds_masks = random_masks(n, LDS_MASKS, 0.5, gen)
    truth = _labels(attributor, ids, a_len, spans, torch.cat([torch.ones(1, n, dtype=torch.bool), lds_masks]), batch_size)
    full_lp = truth[0]
    truth = truth[1:]

    scores: dict[str, list[torch.Tensor]] = {}  # method -> per target (+ whole answer last)
    cost: dict[str, dict[str, float]] = {}
    targets_rows = [rows for _, rows in targets] + [all_rows]
    for name, est in estimators.items():
        t = time.perf_counter()
        scores[name] = [est(target_features(run.token_features[:, columns], rows)) for rows in targets_rows]
        cost[name] = {"forward_passes": 0, "seconds": time.perf_counter() - t, "generation_seconds": gen_seconds}

    t = time.perf_counter()
    single = ~torch.eye(n, dtype=torch.bool)
    loo_lp = _labels(attributor, ids, a_len, spans, single, batch_size)
    scores["leave_one_out"] = [
        leave_one_out_scores(target_log_odds(full_lp, rows), target_log_odds(loo_lp, rows)) for rows in targets_rows
    ]
    cost["leave_one_out"] = {"forward_passes": n + 1, "seconds": time.perf_counter() - t}

    biggest = max(surrogate_sizes)
    t = time.perf_counter()
    sur_masks = random_masks(n, biggest, 0.5, gen)
    sur_lp = _labels(attributor, ids, a_len, spans, sur_masks, batch_size)
    pass_seconds = (time.perf_counter() - t) / biggest
    for size in surrogate_sizes:
        t = time.perf_counter()
        scores[f"contextcite_{size}"] = [
            surrogate_scores(sur_masks[:size], target_log_odds(sur_lp[:size], rows)) for rows in targets_rows
        ]
        cost[f"contextcite_{size}"] = {"forward_passes": size, "seconds": pass_seconds * size + time.perf_counter() - t}

    result: dict[str, Any] = {"id": example.id, "num_sources": n, "num_targets": len(targets), "methods": {}}
    drop_masks: dict[tuple[str, int], torch.Tensor] = {}
    for name, per_target in scores.items():
        lds_values = [lds(per_target[i], lds_masks, target_log_odds(truth, rows)) for i, (_, rows) in enumerate(targets)]
        lds_values = [v for v in lds_values if not math.isnan(v)]
        result["methods"][name] = {"lds": sum(lds_values) / len(lds_values) if lds_values else float("nan"), "cost": cost[name]}
        for k in TOP_K:
            drop_masks[(name, k)] = top_k_mask(per_target[-1], k)
    unique = sorted({tuple(m.tolist()) for m in drop_masks.values()})
    unique_lp = _labels(attributor, ids, a_len, spans, torch.tensor(unique, dtype=torch.bool), batch_size)
    full_answer_lp = float(target_log_prob(full_lp, all_rows))
    for (name, k), mask in drop_masks.items():
        lp = float(target_log_prob(unique_lp[unique.index(tuple(mask.tolist()))], all_rows))
        result["methods"][name][f"top{k}_drop"] = full_answer_lp - lp
    return result


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    methods: dict[str, dict[str, Any]] = {}
    for row in rows:
        for name, values in row["methods"].items():
            agg = methods.setdefault(name, {"lds": [], **{f"top{k}_drop": [] for k in TOP_K}, "passes": [], "seconds": []})
            if not math.isnan(values["lds"]):
                agg["lds"].append(values["lds"])
            for k in TOP_K:
                agg[f"top{k}_drop"].append(values[f"top{k}_drop"])
            agg["passes"].append(values["cost"]["forward_passes"])
            agg["seconds"].append(values["cost"]["seconds"])

    def mean(v: list[float]) -> float:
        return sum(v) / len(v) if v else float("nan")

    def sem(v: list[float]) -> float:
        if len(v) < 2:
            return float("nan")
        m = mean(v)
        return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1) / len(v))

    return {
        name: {
            "lds": mean(a["lds"]),
            "lds_sem": sem(a["lds"]),
            **{f"top{k}_drop": mean(a[f"top{k}_drop"]) for k in TOP_K},
            **{f"top{k}_drop_sem": sem(a[f"top{k}_drop"]) for k in TOP_K},
            "extra_forward_passes": mean(a["passes"]),
            "seconds_per_example": mean(a["seconds"]),
        }
        for name, a in methods.items()
    }


def plot_summary(summary: dict[str, Any], path: str | os.PathLike[str], title: str = "") -> Path:
    from ..plotting import pyplot, save_figure

    plt = pyplot()
    names = list(summary)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, metric, label in zip(axes, ["lds", "top1_drop", "top3_drop"], ["LDS (higher is better)", "top-1 log-prob drop", "top-3 log-prob drop"]):
        values = [summary[n][metric] for n in names]
        errs = [summary[n].get(metric + "_sem", 0) for n in names]
        errs = [0 if (e is None or math.isnan(e)) else e for e in errs]
        ax.bar(range(len(names)), values, yerr=errs, color=["#d62728" if n == "at2" else "#7f7f7f" for n in names])
        ax.set_xticks(range(len(names)), [f"{n}\n({summary[n]['extra_forward_passes']:.0f} passes)" for n in names], fontsize=7, rotation=30, ha="right")
        ax.set_title(label, fontsize=9)
    fig.suptitle(title or "Attribution faithfulness on held-out examples", fontsize=10)
    return save_figure(fig, path)


def evaluate(
    examples: str | os.PathLike[str] | Iterable[Any],
    attributor: Attributor,
    estimators: dict[str, ScoreEstimator] | None = None,
    output: str | os.PathLike[str] | None = None,
    plot: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    seed: int = 1,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    part: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Evaluate every method on the examples (or on part K of N of them, to run N processes side by side);
    write the JSON report (atomically) and the plot if asked."""
    todo = read_examples(examples)[: limit or None]
    todo = todo[part[0] :: part[1]] if part else todo
    if estimators is None:
        estimators = {"at2": attributor.estimator, "average_attention": ScoreEstimator.uniform(attributor.num_layers, attributor.num_heads)}
    rows = []
    for example in tqdm(todo, desc="evaluate", unit="ex", disable=None):
        row = evaluate_example(attributor, estimators, example, seed, max_new_tokens, batch_size)
        if row is not None:
            rows.append(row)
    report = {
        "model_id": attributor.model_id,
        "estimator": attributor.estimator.config_dict(),
        "num_examples": len(rows),
        "lds_masks": LDS_MASKS,
        "summary": summarize(rows),
        "examples": rows,
    }
    write_report(report, output, plot)
    return report


def write_report(report: dict[str, Any], output: str | os.PathLike[str] | None, plot: str | os.PathLike[str] | None) -> None:
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, output)
    if plot is not None:
        plot_summary(report["summary"], plot, f"{report['model_id']}: {report['num_examples']} held-out examples")


def merge_reports(paths: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """One report from the parts written by several evaluation processes."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    rows = [row for part in parts for row in part["examples"]]
    return {**parts[0], "num_examples": len(rows), "summary": summarize(rows), "examples": rows}
