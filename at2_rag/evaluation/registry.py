"""Pluggable evaluation metrics: a metric is one callable returning a dict of numbers, registered once.

`evaluate` calls every registered metric for every method on every example (`MethodScores` is what it sees);
the summary averages each of its columns over examples (with a standard error), the plot draws one panel per
column and the model card one table column, all read from the registration. Adding a metric is one
`@register_metric(...)` function, nowhere else:

    @register_metric("top1_share", MetricColumn("top1_share", "share of the top source", digits=3))
    def top1_share(m: MethodScores) -> dict[str, float]:
        whole = m.scores[-1]
        return {"top1_share": float(whole.max() / whole.abs().sum())}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidInputError


@dataclass(frozen=True)
class MetricColumn:
    """One number a metric reports per example and method: averaged into `summary[method][key]` (NaN skipped,
    `key + "_sem"` beside it), drawn as a panel titled `label`, shown on the model card with `digits` decimals."""

    key: str
    label: str
    digits: int = 3
    plot: bool = True  # a panel in the evaluation plot
    card: bool = True  # a column in the model card's evaluation table

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class MethodScores:
    """What a metric sees: one method's scores on one held-out example and the ablations measured for it.

    `scores[i]` scores the sources for answer sentence i; the last row scores them for the whole answer.
    `lds_log_odds[i]` is sentence i's log-odds under each of `lds_masks` (the LDS ground truth), and
    `dependent[i]` says whether the documents move it at all. `answer_log_prob` measures further masks on
    demand (ablation passes, cached with the example)."""

    method: str
    scores: torch.Tensor  # [targets + 1, sources]
    lds_masks: torch.Tensor  # [masks, sources] bool, True = kept
    lds_log_odds: list[torch.Tensor]  # per target sentence: [masks]
    dependent: list[bool]
    measure: Callable[[Sequence[tuple[bool, ...]]], list[float]] = field(repr=False)

    @property
    def num_sources(self) -> int:
        return int(self.scores.shape[1])

    def answer_log_probs(self, keep_masks: Sequence[torch.Tensor | Sequence[bool]]) -> list[float]:
        """The whole answer's log-probability with only each mask's sources kept (unmeasured masks in one batch)."""
        masks = [tuple(bool(x) for x in (m.tolist() if isinstance(m, torch.Tensor) else m)) for m in keep_masks]
        for mask in masks:
            if len(mask) != self.num_sources:
                raise ValueError(f"a keep-mask needs {self.num_sources} entries (one per source), got {len(mask)}")
        return self.measure(masks)

    def answer_log_prob(self, keep: torch.Tensor | Sequence[bool]) -> float:
        return self.answer_log_probs([keep])[0]


MetricFn = Callable[[MethodScores], dict[str, float]]


@dataclass(frozen=True)
class Metric:
    name: str
    fn: MetricFn
    columns: tuple[MetricColumn, ...]

    def __call__(self, scores: MethodScores) -> dict[str, float]:
        values = self.fn(scores)
        expected = {c.key for c in self.columns}
        if not isinstance(values, dict) or set(values) != expected:
            got = sorted(values) if isinstance(values, dict) else type(values).__name__
            raise TypeError(f"metric {self.name!r} must return a dict with keys {sorted(expected)}, got {got}")
        return {k: float(v) for k, v in values.items()}


_METRICS: dict[str, Metric] = {}


def register_metric(name: str, *columns: MetricColumn) -> Callable[[MetricFn], MetricFn]:
    """Decorator: register `fn` as metric `name`, reporting `columns` (in that order on the card and the plot)."""
    if not columns:
        raise ValueError(f"metric {name!r} needs at least one MetricColumn")

    def decorate(fn: MetricFn) -> MetricFn:
        if name in _METRICS and _METRICS[name].fn is not fn:
            raise ValueError(f"metric {name!r} is already registered")
        taken = {c.key: m.name for m in _METRICS.values() if m.name != name for c in m.columns}
        for column in columns:
            if column.key in taken or column.key in RESERVED_KEYS:
                raise ValueError(f"metric {name!r}: column {column.key!r} is already reported by "
                                 f"{taken.get(column.key, 'the evaluation itself')}")
        _METRICS[name] = Metric(name, fn, tuple(columns))
        return fn

    return decorate


def unregister_metric(name: str) -> None:
    """Remove a metric (tests, or a project replacing a built-in one)."""
    if name not in _METRICS:
        raise KeyError(f"no metric {name!r} is registered (registered: {', '.join(_METRICS)})")
    del _METRICS[name]


def registered_metrics() -> list[str]:
    return list(_METRICS)


def metrics(names: Sequence[str] | None = None) -> list[Metric]:
    """The registered metrics (all of them, in registration order, or `names` in that order)."""
    if names is None:
        return list(_METRICS.values())
    if isinstance(names, str):
        raise TypeError("metrics takes a list of metric names, not one string")
    unknown = [n for n in names if n not in _METRICS]
    if unknown:
        raise InvalidInputError(f"unknown metric(s) {', '.join(map(repr, unknown))}; registered: {', '.join(_METRICS)}")
    return [_METRICS[n] for n in names]


# what evaluate itself reports per method (cost), summarized like a metric column but not computed by one
COST_COLUMNS = (
    MetricColumn("extra_forward_passes", "extra forward passes", digits=1, plot=False),
    MetricColumn("seconds_per_example", "seconds per example", digits=3, plot=False, card=False),
)
RESERVED_KEYS = {"cost", *(c.key for c in COST_COLUMNS)}


def columns(selected: Sequence[Metric] | None = None) -> list[MetricColumn]:
    """Every column the metrics report, in order, then the cost columns."""
    return [c for m in (metrics() if selected is None else selected) for c in m.columns] + list(COST_COLUMNS)
