"""Overhead accounting for benchmarks: seconds spent inside capture, per phase, while `attention.timed_capture` is
active; outside it, capture reads one module variable and pays nothing else."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class CaptureTimings:
    """Seconds spent inside capture while `timed_capture` is active, per phase, for overhead accounting.

    `attention`: whole capturing attention calls (the kernel included); `kernel`: the stock kernel they delegate to;
    `release`: replacing a layer's previous key tensor (a free plain generation performs too, in the cache update);
    `read`: `CaptureState.features`. `calls` counts attention calls.
    """

    attention: float = 0.0
    kernel: float = 0.0
    release: float = 0.0
    read: float = 0.0
    calls: int = 0


_ACTIVE: CaptureTimings | None = None  # set by `attention.timed_capture` only (one at a time)


def current() -> CaptureTimings | None:
    """The timings being clocked now, if a `timed_capture` block is active."""
    return _ACTIVE


def activate(timings: CaptureTimings | None) -> None:
    global _ACTIVE
    _ACTIVE = timings


def clocked(fn: Callable[..., Any], timings: CaptureTimings, phase: str, count: bool = False) -> Callable[..., Any]:
    """`fn`, adding the seconds each call takes to `timings.<phase>`."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        if count:
            timings.calls += 1
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            setattr(timings, phase, getattr(timings, phase) + time.perf_counter() - t)

    return timed
