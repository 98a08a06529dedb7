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

import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..attribution.estimator import ScoreEstimator
from ..attribution.refine import RefinementPrior, refine_scores
from ..attributor import Attributor
from ..capture.features import target_features
from ..capture.masked import (
    ablated_answer_logit_probs,
    random_masks,
    target_log_odds,
    target_log_prob,
)
from ..errors import InputFileError
from ..evidence.ablations import most_informative
from ..evidence.layout import source_layout
from ..examples import example_digest, example_seed, read_examples
from ..prompting.answer import answer_targets
from ..storage.files import atomic_path, read_user_text
from . import metrics as _builtin_metrics  # noqa: F401 - registers the built-in metrics (LDS, top-k drop)
from .baselines import leave_one_out_scores, surrogate_scores
from .registry import COST_COLUMNS, MethodScores, Metric, MetricColumn, columns, metrics

logger = logging.getLogger(__name__)

LDS_MASKS = 32
DEPENDENT_STD = 1.0  # nats: a target counts as document-dependent when its log-odds vary this much across masks
SURROGATE_SIZES = (32, 64)
BUDGETS = (2, 4, 8, 16)  # ablation passes of the budget curve (AT2+k against ContextCite-k on the same masks)


def budget_method(name: str, k: int) -> str:
    """The name of `name` refined with k ablations in a report (`at2+4`)."""
    return f"{name}+{k}"


def _labels(
    attributor: Attributor, ids: list[int], answer_len: int, spans: Any, masks: torch.Tensor, batch: int
) -> torch.Tensor:
    with attributor.lock:
        return ablated_answer_logit_probs(attributor.model, ids, answer_len, spans, masks, batch)


@dataclass
class ExampleAblations:
    """Everything about one held-out example that does not depend on the estimator under test.

    The answer's target features and every ablation measured for it (LDS ground truth, leave-one-out,
    surrogate fits, top-k probes). Saved per example under `--cache`, so evaluating another estimator on the
    same examples re-runs nothing but the few top-k masks no earlier run measured.
    """

    id: str
    input_ids: torch.Tensor  # prompt + the greedy answer, as measured
    spans: torch.Tensor  # [sources, 2] token span of every document
    target_rows: list[list[int]]  # answer rows of each target sentence, then of the whole answer
    features: torch.Tensor  # [targets + 1, sources, layers * heads]
    full_lp: torch.Tensor  # [answer_len] nothing ablated
    lds_masks: torch.Tensor  # [LDS_MASKS, sources]
    lds_lp: torch.Tensor  # [LDS_MASKS, answer_len]
    loo_lp: torch.Tensor  # [sources, answer_len], row i = source i ablated
    surrogate_masks: torch.Tensor  # [max surrogate size, sources]
    surrogate_lp: torch.Tensor
    probe_masks: torch.Tensor  # further masks measured for top-k drops
    probe_lp: torch.Tensor
    seconds: dict[str, float]  # generation, leave_one_out, surrogate_pass
    key: dict[str, Any]  # what the numbers depend on: model, seed, max_new_tokens, mask counts

    @property
    def num_sources(self) -> int:
        return self.features.shape[1]

    def measured(self) -> dict[tuple[bool, ...], torch.Tensor]:
        """Every mask with a measured answer, keep-mask tuple -> per-token logit-probs."""
        n = self.num_sources
        table = {tuple([True] * n): self.full_lp}
        loo = ~torch.eye(n, dtype=torch.bool)
        for masks, lps in ((self.lds_masks, self.lds_lp), (loo, self.loo_lp),
                           (self.surrogate_masks, self.surrogate_lp), (self.probe_masks, self.probe_lp)):
            for mask, lp in zip(masks.tolist(), lps):
                table[tuple(mask)] = lp
        return table

    def save(self, path: Path) -> None:
        """Atomically: a killed run leaves the old file or none, never half of one."""
        tensors = {
            name: getattr(self, name).contiguous()
            for name in ("input_ids", "spans", "features", "full_lp", "lds_lp", "loo_lp", "surrogate_lp", "probe_lp")
        }
        for name in ("lds_masks", "surrogate_masks", "probe_masks"):
            tensors[name] = getattr(self, name).to(torch.uint8).contiguous()
        meta = {"format": CACHE_FORMAT, "id": self.id, "target_rows": json.dumps(self.target_rows),
                "seconds": json.dumps(self.seconds), "key": json.dumps(self.key, sort_keys=True)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> ExampleAblations:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CACHE_FORMAT:
                raise ValueError(f"{path} is not an at2-rag evaluation cache file ({meta.get('format')!r})")
            t = {name: f.get_tensor(name) for name in f.keys()}
        for name in ("lds_masks", "surrogate_masks", "probe_masks"):
            t[name] = t[name].bool()
        return cls(id=meta["id"], target_rows=json.loads(meta["target_rows"]), seconds=json.loads(meta["seconds"]),
                   key=json.loads(meta["key"]), **t)


CACHE_FORMAT = "at2-rag-eval-cache-v1"


def _cache_path(cache_dir: Path, example_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", example_id)[:60]
    digest = hashlib.sha256(example_id.encode()).hexdigest()[:10]
    return cache_dir / f"{safe}-{digest}.safetensors"


def measure_ablations(
    attributor: Attributor,
    example: Any,
    seed: int = 1,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    surrogate_size: int = max(SURROGATE_SIZES),
) -> ExampleAblations | None:
    """Generate the answer with capture and run every estimator-independent ablation of one example."""
    t0 = time.perf_counter()
    request = {"query": example.query, "documents": example.documents, "history": example.history}
    run = attributor.run(attributor.prepare(request, max_new_tokens=max_new_tokens))
    gen_seconds = time.perf_counter() - t0
    targets = answer_targets(run.answer)
    spans, columns, _ = source_layout(run, "documents")
    n = len(spans)
    if not targets or n == 0:
        return None
    ids = run.prompt.input_ids + run.answer.token_ids
    a_len = len(run.answer.token_ids)
    target_rows = [list(rows) for _, rows in targets]
    target_rows.append([r for rows in target_rows for r in rows])
    features = torch.stack([target_features(run.token_features[:, columns], rows) for rows in target_rows])
    gen = torch.Generator().manual_seed(example_seed(seed, example.id))

    lds_masks = random_masks(n, LDS_MASKS, 0.5, gen)  # fresh masks: the LDS ground truth
    everything = torch.ones(1, n, dtype=torch.bool)
    truth = _labels(attributor, ids, a_len, spans, torch.cat([everything, lds_masks]), batch_size)
    t = time.perf_counter()
    loo_lp = _labels(attributor, ids, a_len, spans, ~torch.eye(n, dtype=torch.bool), batch_size)
    loo_seconds = time.perf_counter() - t
    t = time.perf_counter()
    surrogate_masks = random_masks(n, surrogate_size, 0.5, gen)
    surrogate_lp = _labels(attributor, ids, a_len, spans, surrogate_masks, batch_size)
    pass_seconds = (time.perf_counter() - t) / surrogate_size
    return ExampleAblations(
        id=example.id, input_ids=torch.tensor(ids), spans=torch.tensor(spans, dtype=torch.long).reshape(n, 2),
        target_rows=target_rows, features=features.float(), full_lp=truth[0], lds_masks=lds_masks,
        lds_lp=truth[1:], loo_lp=loo_lp, surrogate_masks=surrogate_masks, surrogate_lp=surrogate_lp,
        probe_masks=torch.zeros(0, n, dtype=torch.bool), probe_lp=torch.zeros(0, a_len),
        seconds={"generation": gen_seconds, "leave_one_out": loo_seconds, "surrogate_pass": pass_seconds},
        key={},
    )


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


def _read_part(path: Path) -> dict[str, Any]:
    """One part report written by `evaluate --part`; anything else is an `InputFileError` naming the file."""
    text = read_user_text(path, "JSON report of `evaluate --part`")
    try:
        part = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputFileError(
            f"{path}:{exc.lineno} is not valid JSON: {exc.msg} (column {exc.colno})", path, exc.lineno
        ) from exc
    if not isinstance(part, dict) or not isinstance(part.get("examples"), list):
        raise InputFileError(f"{path} is not a report of `evaluate --part` (no list of 'examples')", path)
    return part


# what every part of one evaluation shares (a part without a field, written before it was recorded, reads None)
MERGE_MUST_AGREE = ("model_id", "estimator", "seed", "max_new_tokens", "lds_masks", "budgets")


def merge_reports(paths: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """One report from the parts written by several evaluation processes."""
    parts = [_read_part(Path(p)) for p in paths]
    names = {tuple(part.get("metrics") or ()) for part in parts}
    if len(names) > 1:
        raise InputFileError(f"the parts were evaluated with different metrics: {sorted(names)}")
    for key in MERGE_MUST_AGREE:  # parts of one evaluation, not two evaluations averaged into one summary
        values = {json.dumps(part.get(key), sort_keys=True) for part in parts}
        if len(values) > 1:
            raise InputFileError(f"the parts were evaluated with different {key}: {', '.join(sorted(values))}")
    seen: dict[str, str] = {}
    for path, part in zip(paths, parts, strict=True):
        for row in part["examples"]:
            example = str(row.get("id")) if isinstance(row, dict) else repr(row)
            if example in seen:
                raise InputFileError(f"example {example} is in two parts ({seen[example]} and {path}): a part given "
                                     "twice, or parts of different splits")
            seen[example] = str(path)
    rows = [row for part in parts for row in part["examples"]]
    summary = summarize(rows, report_columns_of(parts[0]))
    return {**parts[0], "num_examples": len(rows), "summary": summary, "examples": rows}


def evaluation_record(report: dict[str, Any], examples: str) -> dict[str, Any]:
    """What an estimator's metadata keeps of a report: the summary and the columns its model card shows."""
    return {
        "examples": examples,
        "num_examples": report["num_examples"],
        "lds_masks": report.get("lds_masks"),
        "columns": [c.to_dict() for c in report_columns_of(report) if c.card],
        "summary": report["summary"],
    }


def record_evaluation(folder: str | os.PathLike[str], report: dict[str, Any], examples: str) -> None:
    """Keep an evaluation summary in the estimator's config and model card (what a Hub page shows)."""
    estimator = ScoreEstimator.from_folder(folder)
    estimator.metadata["evaluation"] = evaluation_record(report, examples)
    estimator.update_card(folder)
