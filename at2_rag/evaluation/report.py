"""Evaluate attribution methods on held-out examples: LDS, top-k log-probability drop and cost.

Methods: the trained estimator (AT2), average attention (uniform weights), leave-one-out (n + 1 passes) and
ContextCite-style lasso surrogates fitted on N random ablations. LDS uses answer sentences as targets and
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..attributor import Attributor
from ..estimator import ScoreEstimator
from ..features import answer_targets, target_features
from ..ablation import (
    ablated_answer_logit_probs,
    random_masks,
    target_log_odds,
    target_log_prob,
)
from ..examples import example_seed, read_examples
from ..layout import source_layout
from .baselines import leave_one_out_scores, surrogate_scores
from .metrics import lds, top_k_mask
from ..errors import InputFileError
from ..files import atomic_path, read_user_text

logger = logging.getLogger(__name__)

LDS_MASKS = 32
DEPENDENT_STD = 1.0  # nats: a target counts as document-dependent when its log-odds vary this much across masks
SURROGATE_SIZES = (32, 64)
TOP_K = (1, 3)


def _labels(attributor: Attributor, ids: list[int], answer_len: int, spans: Any, masks: torch.Tensor, batch: int) -> torch.Tensor:
    with attributor.runner.lock:
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
    def load(cls, path: Path) -> "ExampleAblations":
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
    run = attributor.capture({"query": example.query, "documents": example.documents, "history": example.history}, max_new_tokens=max_new_tokens)
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
    truth = _labels(attributor, ids, a_len, spans, torch.cat([torch.ones(1, n, dtype=torch.bool), lds_masks]), batch_size)
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
) -> dict[str, Any] | None:
    """Per-method LDS (mean over target sentences), top-k drops and cost for one example.

    With `cache_dir`, the example's ablations are read from there when an earlier run with the same model,
    seed and settings measured them, and written there otherwise.
    """
    key = {"model_id": attributor.model_id, "seed": seed, "max_new_tokens": max_new_tokens,
           "lds_masks": LDS_MASKS, "surrogate_size": max(surrogate_sizes)}
    path = _cache_path(Path(cache_dir), example.id) if cache_dir is not None else None
    data = None
    if path is not None and path.exists():
        cached = ExampleAblations.load(path)
        if cached.key == key and cached.id == example.id:
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
        scores[name] = torch.stack([est(f) for f in data.features])
        cost[name] = {"forward_passes": 0, "seconds": time.perf_counter() - t, "generation_seconds": data.seconds["generation"]}
    scores["leave_one_out"] = torch.stack([
        leave_one_out_scores(target_log_odds(data.full_lp, rows), target_log_odds(data.loo_lp, rows))
        for rows in data.target_rows
    ])
    cost["leave_one_out"] = {"forward_passes": n + 1, "seconds": data.seconds["leave_one_out"]}
    for size in surrogate_sizes:
        t = time.perf_counter()
        masks, lps = data.surrogate_masks[:size], data.surrogate_lp[:size]
        scores[f"contextcite_{size}"] = torch.stack([surrogate_scores(masks, target_log_odds(lps, rows)) for rows in data.target_rows])
        cost[f"contextcite_{size}"] = {
            "forward_passes": size, "seconds": data.seconds["surrogate_pass"] * size + time.perf_counter() - t
        }

    result: dict[str, Any] = {"id": example.id, "num_sources": n, "num_targets": len(targets), "methods": {}}
    drop_masks: dict[tuple[str, int], tuple[bool, ...]] = {}
    truths = [target_log_odds(data.lds_lp, rows) for rows in targets]
    # targets whose answer the documents move (label spread >= DEPENDENT_STD nats across the LDS masks): chosen
    # from the ground truth alone, so the subset is the same for every method
    dependent = [float(y.std()) >= DEPENDENT_STD for y in truths]
    result["num_dependent_targets"] = sum(dependent)
    for name, per_target in scores.items():
        values = [lds(per_target[i], data.lds_masks, y) for i, y in enumerate(truths)]
        result["methods"][name] = {
            "lds": _nanmean(values),
            "lds_dependent": _nanmean([v for v, dep in zip(values, dependent) if dep]),
            "cost": cost[name],
        }
        for k in TOP_K:
            drop_masks[(name, k)] = tuple(top_k_mask(per_target[-1], k).tolist())
    measured = data.measured()
    missing = sorted({m for m in drop_masks.values() if m not in measured})
    if missing:
        new_lp = _labels(attributor, data.input_ids.tolist(), data.full_lp.shape[0], [tuple(s) for s in data.spans.tolist()],
                         torch.tensor(missing, dtype=torch.bool), batch_size)
        data.probe_masks = torch.cat([data.probe_masks, torch.tensor(missing, dtype=torch.bool)])
        data.probe_lp = torch.cat([data.probe_lp, new_lp])
        measured.update(zip(missing, new_lp))
        if path is not None:
            data.save(path)
    full_answer_lp = float(target_log_prob(data.full_lp, whole))
    for (name, k), mask in drop_masks.items():
        result["methods"][name][f"top{k}_drop"] = full_answer_lp - float(target_log_prob(measured[mask], whole))
    return result


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    methods: dict[str, dict[str, Any]] = {}
    for row in rows:
        for name, values in row["methods"].items():
            agg = methods.setdefault(
                name, {"lds": [], "lds_dependent": [], **{f"top{k}_drop": [] for k in TOP_K}, "passes": [], "seconds": []}
            )
            for key in ("lds", "lds_dependent"):
                if not math.isnan(values.get(key, float("nan"))):
                    agg[key].append(values[key])
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
            "lds_dependent": mean(a["lds_dependent"]),
            "lds_dependent_sem": sem(a["lds_dependent"]),
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
    panels = {"lds": "LDS, all answer sentences", "lds_dependent": "LDS, document-dependent sentences",
              "top1_drop": "top-1 log-prob drop", "top3_drop": "top-3 log-prob drop"}
    panels = {k: v for k, v in panels.items() if any(k in summary[n] for n in names)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.8))
    for ax, (metric, label) in zip(axes, panels.items()):
        values = [summary[n].get(metric, float("nan")) for n in names]
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
    batch_size: int = 64,
    part: tuple[int, int] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Evaluate every method on the examples (or on part K of N of them, to run N processes side by side);
    write the JSON report (atomically) and the plot if asked."""
    todo = read_examples(examples, limit=limit or None)
    todo = todo[part[0] :: part[1]] if part else todo
    if estimators is None:
        estimators = {"at2": attributor.estimator, "average_attention": ScoreEstimator.uniform(attributor.num_layers, attributor.num_heads)}
    rows = []
    for example in tqdm(todo, desc="evaluate", unit="ex", disable=None):
        row = evaluate_example(attributor, estimators, example, seed, max_new_tokens, batch_size, cache_dir=cache_dir)
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
        with atomic_path(output) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
    if plot is not None:
        plot_summary(report["summary"], plot, f"{report['model_id']}: {report['num_examples']} held-out examples")


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


def merge_reports(paths: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """One report from the parts written by several evaluation processes."""
    parts = [_read_part(Path(p)) for p in paths]
    rows = [row for part in parts for row in part["examples"]]
    return {**parts[0], "num_examples": len(rows), "summary": summarize(rows), "examples": rows}
