"""Evaluate attribution methods on held-out examples: LDS, top-k log-probability drop and cost.

Methods: the trained estimator (AT2), average attention (uniform weights), leave-one-out (n + 1 passes),
ContextCite-style lasso surrogates fitted on N random ablations, and at every budget k the pair that the budget
curve compares: AT2 refined with k ablations (`at2+k`, exactly as `ablations=k` does it at run time) and
ContextCite fitted on the same k masks (`contextcite_k`). LDS uses answer sentences as targets and
fresh random masks (also reported over the document-dependent sentences alone: those whose log-odds the masks
move by at least a nat, since a sentence the documents barely affect, such as a fragment cut off by the token
limit, has a near-constant label whose ranking is noise); top-k drop uses the whole answer as target.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..attribution.estimator import ScoreEstimator
from ..attribution.refine import RefinementPrior, refine_scores
from ..attributor import Attributor
from ..capture.masked import (
    target_log_odds,
    target_log_prob,
)
from ..errors import InputFileError
from ..evidence.ablations import most_informative
from ..examples import example_digest, read_examples
from ..storage.files import atomic_path
from . import metrics as _builtin_metrics  # noqa: F401 - registers the built-in metrics (LDS, top-k drop)
from .ablation_cache import LDS_MASKS, SURROGATE_SIZES, ExampleAblations, _cache_path, _labels, measure_ablations
from .baselines import leave_one_out_scores, surrogate_scores
from .plots import plot_budget_curve, plot_summary
from .registry import COST_COLUMNS, MethodScores, Metric, MetricColumn, columns, metrics

logger = logging.getLogger(__name__)

DEPENDENT_STD = 1.0  # nats: a target counts as document-dependent when its log-odds vary this much across masks
BUDGETS = (2, 4, 8, 16)  # ablation passes of the budget curve (AT2+k against ContextCite-k on the same masks)


def budget_method(name: str, k: int) -> str:
    """The name of `name` refined with k ablations in a report (`at2+4`)."""
    return f"{name}+{k}"


def evaluate_example(
    attributor: Attributor,
    estimators: dict[str, ScoreEstimator],
    example: Any,
    seed: int = 1,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    surrogate_sizes: Sequence[int] = SURROGATE_SIZES,
    cache_dir: str | os.PathLike[str] | None = None,
    metric_names: Sequence[str] | None = None,
    budgets: Sequence[int] = BUDGETS,
) -> dict[str, Any] | None:
    """Every registered metric (or those named) and the cost, per method, for one example.

    Budget k: the k most informative of the example's distinct random surrogate masks (the label-free design
    `ablations=k` uses at run time, capped alike) are the observed ablations of every estimator refined by them
    (`at2+k`, `average_attention+k`, each with its own refinement prior) and of `contextcite_k` (a surrogate
    fitted on them alone).

    With `cache_dir`, the example's ablations are read from there when an earlier run with the same model,
    seed and settings measured them, and written there otherwise (with any mask a metric measured since).
    """
    selected: list[Metric] = metrics(metric_names)
    key = {"model_id": attributor.model_id, "seed": seed, "max_new_tokens": max_new_tokens,
           "lds_masks": LDS_MASKS, "surrogate_size": max(surrogate_sizes), "example_digest": example_digest(example)}
    path = _cache_path(Path(cache_dir), example.id) if cache_dir is not None else None
    data = None
    if path is not None and path.exists():
        cached = ExampleAblations.load(path)
        # files written before the example's content was recorded in the key are matched on the rest of it
        if {"example_digest": key["example_digest"], **cached.key} == key and cached.id == example.id:
            data = cached
        else:
            logger.info("cache for %s was measured with %s, not %s: measuring again", example.id, cached.key, key)
    if data is None:
        data = measure_ablations(attributor, example, seed, max_new_tokens, batch_size, max(surrogate_sizes))
        if data is None:
            return None
        data.key = key
        if path is not None:
            data.save(path)
    n = data.num_sources
    targets, whole = data.target_rows[:-1], data.target_rows[-1]

    scores: dict[str, torch.Tensor] = {}  # method -> [targets + 1, sources]
    cost: dict[str, dict[str, float]] = {}
    for name, est in estimators.items():
        t = time.perf_counter()
        scores[name] = torch.stack([est(f) for f in data.features]).detach()
        cost[name] = {"forward_passes": 0, "seconds": time.perf_counter() - t,
                      "generation_seconds": data.seconds["generation"]}
    scores["leave_one_out"] = torch.stack([
        leave_one_out_scores(target_log_odds(data.full_lp, rows), target_log_odds(data.loo_lp, rows))
        for rows in data.target_rows
    ])
    cost["leave_one_out"] = {"forward_passes": n + 1, "seconds": data.seconds["leave_one_out"]}
    for size in surrogate_sizes:
        t = time.perf_counter()
        masks, lps = data.surrogate_masks[:size], data.surrogate_lp[:size]
        scores[f"contextcite_{size}"] = torch.stack(
            [surrogate_scores(masks, target_log_odds(lps, rows)) for rows in data.target_rows]
        )
        cost[f"contextcite_{size}"] = {
            "forward_passes": size, "seconds": data.seconds["surrogate_pass"] * size + time.perf_counter() - t
        }

    # the run-time design picks from distinct masks, and caps k at their number
    distinct = sorted({tuple(m): i for i, m in reversed(list(enumerate(data.surrogate_masks.tolist())))}.values())
    pool, pool_lp = data.surrogate_masks[distinct], data.surrogate_lp[distinct]
    for k in budgets:
        t = time.perf_counter()
        chosen = most_informative(pool, k)
        masks, lps = pool[chosen], pool_lp[chosen]
        observed = [target_log_odds(lps, rows) for rows in data.target_rows]
        design_seconds = time.perf_counter() - t
        pass_seconds = data.seconds["surrogate_pass"] * len(chosen)
        for name, est in estimators.items():
            t = time.perf_counter()
            prior = RefinementPrior.from_metadata(est.metadata)
            scores[budget_method(name, k)] = torch.stack(
                [refine_scores(s, masks, y, prior) for s, y in zip(scores[name], observed, strict=True)]
            )
            cost[budget_method(name, k)] = {
                "forward_passes": len(chosen), "seconds": pass_seconds + design_seconds + time.perf_counter() - t
            }
        if k in surrogate_sizes:
            continue  # contextcite_k is the surrogate on k random masks above; AT2+k is still measured
        t = time.perf_counter()
        scores[f"contextcite_{k}"] = torch.stack([surrogate_scores(masks, y) for y in observed])
        cost[f"contextcite_{k}"] = {
            "forward_passes": len(chosen), "seconds": pass_seconds + design_seconds + time.perf_counter() - t
        }

    truths = [target_log_odds(data.lds_lp, rows) for rows in targets]
    # targets whose answer the documents move (label spread >= DEPENDENT_STD nats across the LDS masks): chosen
    # from the ground truth alone, so the subset is the same for every method
    dependent = [float(y.std()) >= DEPENDENT_STD for y in truths]
    result: dict[str, Any] = {"id": example.id, "num_sources": n, "num_targets": len(targets),
                              "num_dependent_targets": sum(dependent), "methods": {}}
    measured = data.measured()
    new_masks: list[tuple[bool, ...]] = []

    def measure(masks: Sequence[tuple[bool, ...]]) -> list[float]:
        """The whole answer's log-prob under each keep-mask; masks no run measured yet cost one batch of passes."""
        missing = sorted({m for m in masks if m not in measured})
        if missing:
            new_lp = _labels(attributor, data.input_ids.tolist(), data.full_lp.shape[0],
                             [tuple(s) for s in data.spans.tolist()], torch.tensor(missing, dtype=torch.bool),
                             batch_size)
            data.probe_masks = torch.cat([data.probe_masks, torch.tensor(missing, dtype=torch.bool)])
            data.probe_lp = torch.cat([data.probe_lp, new_lp])
            measured.update(zip(missing, new_lp, strict=True))
            new_masks.extend(missing)
        return [float(target_log_prob(measured[m], whole)) for m in masks]

    for name, per_target in scores.items():
        view = MethodScores(name, per_target, data.lds_masks, truths, dependent, measure)
        values: dict[str, Any] = {}
        for metric in selected:
            values.update(metric(view))
        result["methods"][name] = {**values, "cost": cost[name]}
    if new_masks and path is not None:
        data.save(path)
    return result


def _cost_values(values: dict[str, Any]) -> dict[str, float]:
    cost = values.get("cost") or {}
    return {"extra_forward_passes": cost.get("forward_passes", float("nan")),
            "seconds_per_example": cost.get("seconds", float("nan"))}


def summarize(rows: list[dict[str, Any]], report_columns: Sequence[MetricColumn] | None = None) -> dict[str, Any]:
    """Per method, every column's mean over the examples (NaN values left out) and its standard error
    (`<key>_sem`); cost columns get the mean only. Columns default to the registered ones the rows report."""
    if report_columns is None:
        keys = {k for row in rows for values in row["methods"].values() for k in values}
        report_columns = [c for c in columns() if c.key in keys or c in COST_COLUMNS]
    cost_keys = {c.key for c in COST_COLUMNS}
    collected: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        for name, values in row["methods"].items():
            flat = {**values, **_cost_values(values)}
            agg = collected.setdefault(name, {c.key: [] for c in report_columns})
            for column in report_columns:
                value = flat.get(column.key, float("nan"))
                if isinstance(value, (int, float)) and not math.isnan(value):
                    agg[column.key].append(float(value))

    def mean(v: list[float]) -> float:
        return sum(v) / len(v) if v else float("nan")

    def sem(v: list[float]) -> float:
        if len(v) < 2:
            return float("nan")
        m = mean(v)
        return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1) / len(v))

    summary: dict[str, Any] = {}
    for name, agg in collected.items():
        out: dict[str, float] = {}
        for column in report_columns:
            out[column.key] = mean(agg[column.key])
            if column.key not in cost_keys:
                out[column.key + "_sem"] = sem(agg[column.key])
        summary[name] = out
    return summary


def _described(estimator: ScoreEstimator) -> dict[str, Any]:
    """The estimator as a report names it: its config without the evaluation recorded in it earlier (this report
    is the evaluation; an older copy inside it would only disagree with it)."""
    config = estimator.config_dict()
    metadata = dict(config.get("metadata") or {})
    metadata.pop("evaluation", None)
    return {**config, "metadata": metadata}


def evaluate(
    examples: str | os.PathLike[str] | Iterable[Any],
    attributor: Attributor,
    estimators: dict[str, ScoreEstimator] | None = None,
    output: str | os.PathLike[str] | None = None,
    plot: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    seed: int = 1,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    part: tuple[int, int] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    metric_names: Sequence[str] | None = None,
    budgets: Sequence[int] = BUDGETS,
    curve: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Evaluate every method on the examples (or on part K of N of them, to run N processes side by side) with
    every registered metric (or those named); write the JSON report (atomically) and the plot if asked."""
    selected = metrics(metric_names)  # an unknown name fails before any model work
    report_columns = columns(selected)
    todo = read_examples(examples, limit=limit or None)
    todo = todo[part[0] :: part[1]] if part else todo
    if estimators is None:
        uniform = ScoreEstimator.uniform(attributor.num_layers, attributor.num_heads)
        estimators = {"at2": attributor.estimator, "average_attention": uniform}
    rows = []
    for example in tqdm(todo, desc="evaluate", unit="ex", disable=None):
        row = evaluate_example(attributor, estimators, example, seed, max_new_tokens, batch_size, cache_dir=cache_dir,
                               metric_names=[m.name for m in selected], budgets=budgets)
        if row is not None:
            rows.append(row)
    report = {
        "model_id": attributor.model_id,
        "estimator": _described(attributor.estimator),
        "num_examples": len(rows),
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "lds_masks": LDS_MASKS,
        "budgets": list(budgets),
        "metrics": [m.name for m in selected],
        "columns": [c.to_dict() for c in report_columns],
        "summary": summarize(rows, report_columns),
        "examples": rows,
    }
    write_report(report, output, plot, curve)
    return report


def report_columns_of(report: dict[str, Any]) -> list[MetricColumn]:
    """The columns a report was summarized with (reports written before they were recorded: the registered ones)."""
    recorded = report.get("columns")
    if not isinstance(recorded, list):
        return columns()
    try:
        return [MetricColumn(**c) for c in recorded]
    except TypeError as exc:
        raise InputFileError(f"the report's 'columns' are not metric columns: {exc}") from exc


def write_report(
    report: dict[str, Any], output: str | os.PathLike[str] | None, plot: str | os.PathLike[str] | None,
    curve: str | os.PathLike[str] | None = None,
) -> None:
    if output is not None:
        with atomic_path(output) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
    if plot is not None:
        plot_summary(report["summary"], plot, f"{report['model_id']}: {report['num_examples']} held-out examples",
                     report_columns_of(report))
    if curve is not None:
        plot_budget_curve(report["summary"], curve,
                          f"{report['model_id']}: fidelity at a budget, {report['num_examples']} held-out examples")
