"""One registered capture backend per attention implementation of transformers: the kernel a capturing call
delegates to (sdpa, the model's own eager function), or the implementation a model is switched to when its
kernel cannot be wrapped (flash, flex, paged). `register_backend` is the one place a backend is defined."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UnsupportedModelError
from . import timing


@dataclass(frozen=True)
class CaptureBackend:
    """How capture runs on one of transformers' attention implementations (`model.set_attn_implementation` names).

    `kernel(module)` returns the function that computes the layer's output (capture wraps it and reads the
    attention itself); a backend without one cannot be wrapped, and capture switches the model to `fallback`
    instead (with a warning giving `reason`), or refuses it when there is no fallback.
    """

    name: str
    kernel: Callable[[torch.nn.Module], Callable[..., Any]] | None = None
    fallback: str | None = None
    reason: str = ""


_BACKENDS: dict[str, CaptureBackend] = {}
_KERNELS: dict[tuple[str, type], Callable[..., Any]] = {}  # (backend, attention module type) -> kernel, resolved once


def register_backend(backend: CaptureBackend) -> None:
    """Add (or replace) the capture entry for one attention implementation: the one place a backend is defined."""
    if backend.kernel is None and backend.fallback is None:
        raise ValueError(f"capture backend {backend.name!r} needs a kernel or a fallback")
    if backend.fallback is not None and backend.fallback not in _BACKENDS:
        raise ValueError(f"capture backend {backend.name!r} falls back to unknown backend {backend.fallback!r}")
    _BACKENDS[backend.name] = backend
    _KERNELS.clear()


def capture_backends() -> dict[str, CaptureBackend]:
    """Every registered backend by implementation name (a copy)."""
    return dict(_BACKENDS)


def _sdpa_kernel(module: torch.nn.Module) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def _eager_kernel(module: torch.nn.Module) -> Callable[..., Any]:
    """The model's own eager function: every modeling file that dispatches through AttentionInterface defines one
    (and falls back to it for "eager"), so its masking and softcapping stay the model's."""
    modeling = sys.modules.get(type(module).__module__)
    eager = getattr(modeling, "eager_attention_forward", None)
    if eager is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} has no eager_attention_forward to delegate to; "
            "switch it to sdpa with model.set_attn_implementation('sdpa')"
        )
    return eager


register_backend(CaptureBackend("sdpa", _sdpa_kernel))
register_backend(CaptureBackend("eager", _eager_kernel))
for _flash in ("flash_attention_2", "flash_attention_3", "flash_attention_4"):
    register_backend(CaptureBackend(
        _flash, fallback="sdpa",
        reason="flash kernels never form the attention weights and take no 4-D mask for capture to honour",
    ))
register_backend(CaptureBackend(
    "flex_attention", fallback="sdpa", reason="flex attention masks with block masks, not a tensor capture can apply"
))
register_backend(CaptureBackend(
    "paged|eager", fallback="sdpa", reason="a paged cache holds no contiguous key tensor to read the attention from"
))

def _base_function(module: torch.nn.Module, base: str) -> Callable[..., Any]:
    """The kernel a capturing call delegates to (looked up once per backend and module type: it runs every call)."""
    cache_key = (base, type(module))
    kernel = _KERNELS.get(cache_key)
    if kernel is None:
        resolve = _BACKENDS[base].kernel
        assert resolve is not None  # only backends with a kernel are ever registered as capturing
        kernel = resolve(module)
        timings = timing.current()
        if timings is not None:
            kernel = timing.clocked(kernel, timings, "kernel")
        _KERNELS[cache_key] = kernel
    return kernel
