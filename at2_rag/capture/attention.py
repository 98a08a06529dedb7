"""Attention capture through transformers' AttentionInterface, without eager attention or N x N memory.

A registered attention function wraps the model's own implementation (sdpa, or the model's eager function
where sdpa is unsupported). Outside a capture it only delegates. Inside one, for the query rows that predict
answer tokens, it keeps the rows' queries and a reference to the layer's keys and lets the model's own kernel
compute the output: a decode step pays for no extra tensor work. The captured rows are turned into features
once, when they are read: softmax(QK^T) in fp32 for those rows only, masked causally (and by the sliding
window), summed per source segment of the keys in one pass to `[batch, rows, sources, heads]` per layer.
Calls whose keys do not start at position 0 (a sliding-window cache) or that carry an explicit mask (padding,
ablation, eager models) are reduced at once instead, honouring that mask.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch

from ..errors import UnsupportedModelError
from . import timing
from .backends import _BACKENDS, _KERNELS, _base_function
from .state import CaptureState, _grouped_scores, _softmax_, _visible
from .timing import CaptureTimings

logger = logging.getLogger(__name__)

CAPTURE_PREFIX = "at2_capture_"

_ACTIVE: contextvars.ContextVar[CaptureState | None] = contextvars.ContextVar("at2_capture_state", default=None)


def _grouped_output(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """probs @ V for grouped heads: [B, H, T, K] x [B, KVH, K, D] -> [B, T, H, D]."""
    b, h, t, k = probs.shape
    kvh = value.shape[1]
    out = torch.matmul(probs.reshape(b, kvh, (h // kvh) * t, k), value)
    return out.reshape(b, h, t, value.shape[-1]).transpose(1, 2).contiguous()


def _capturing_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    _base: str,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered attention function (positional order as transformers' sdpa_attention_forward; models pass
    the rest by keyword), bound to its base implementation with functools.partial: no extra Python frame."""
    base_fn = _base_function(module, _base)
    state = _ACTIVE.get()
    if state is None or (
        (attention_mask is None or state.left_padding is not None)
        and query.shape[2] == 1
        and state.keep_decode_row(getattr(module, "layer_idx", None), query, key)
    ):
        return base_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if kwargs.get("s_aux") is not None:
        raise UnsupportedModelError("attention sinks (s_aux) are not supported by at2-rag's capture")
    layer = getattr(module, "layer_idx", None)
    if layer is None or not 0 <= layer < state.num_layers:
        raise UnsupportedModelError(f"{type(module).__name__} has no valid layer_idx ({layer!r})")

    q_len, k_len = query.shape[2], key.shape[2]
    start = state.seen[layer]
    state.seen[layer] = start + q_len
    lo = max(state.capture_from - start, 0)
    hi = q_len if state.capture_to is None else min(q_len, state.capture_to - start)
    if lo >= hi:
        return base_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    scaling = scaling if scaling is not None else cast(int, module.head_dim) ** -0.5
    softcap = kwargs.get("softcap")
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else state.module_window(layer, module)
    key_start = start + q_len - k_len  # keys are a contiguous window ending at the newest token
    if (attention_mask is None or state.left_padding is not None) and key_start == 0:
        # every key from position 0 is here and only causality (and the window, and a batch's left padding) masks
        # it: reduce later, let the model's kernel compute the output now
        # a slice is copied at once: it would pin the whole query tensor of a prefill
        rows = query if hi - lo == q_len else query[:, :, lo:hi].clone()
        state.defer(layer, rows, key, start + lo, scaling, softcap, window)
        return base_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    state.flush(layer)  # keep the rows in order: earlier deferred rows first
    scores = _grouped_scores(query[:, :, lo:hi], key, scaling).to(torch.float32)
    if softcap is not None:
        scores.div_(softcap).tanh_().mul_(softcap)
    if attention_mask is not None:
        mask = attention_mask[..., lo:hi, :k_len]
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask)
    elif hi - lo == 1 and hi == q_len and (not window or k_len <= window):
        pass  # one row at the newest position: every key in the window is visible (prefill end, decode step)
    else:
        q_pos = torch.arange(start + lo, start + hi, device=query.device)
        k_pos = torch.arange(key_start, key_start + k_len, device=query.device)
        scores.masked_fill_(~_visible(q_pos, k_pos, window), float("-inf"))
    probs = _softmax_(scores)  # [B, H, T, K]

    state.rows[layer].append(state.reduce(probs, key_start).permute(0, 2, 3, 1))  # [B, T, S, H]

    if lo == 0 and hi == q_len:
        return _grouped_output(probs.to(value.dtype), value), None
    return base_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


_CAPTURING: dict[str, Callable[..., Any]] = {}  # registered capturing implementation name -> its function


def _register(base: str) -> str:
    """Register the capturing implementation for `base` with transformers (once): `at2_capture_<base>`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = f"{CAPTURE_PREFIX}{base}"
    if name not in _CAPTURING:
        fn = functools.partial(_capturing_attention, _base=base)
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
        _CAPTURING[name] = fn
    return name


def attention_implementation(model: torch.nn.Module) -> str:
    """The model's current attention implementation name. transformers 5 keeps it only in the config property
    `_attn_implementation` (set through the public `set_attn_implementation`): this is the one place it is read."""
    return str(text_config(model)._attn_implementation or "sdpa")


def capture_base(implementation: str) -> str:
    """The capturable backend used for a model running `implementation` (itself, or its registered fallback);
    an implementation with no capture entry is an UnsupportedModelError saying how to switch."""
    backend = _BACKENDS.get(implementation)
    if backend is None:
        capturable = ", ".join(name for name, b in _BACKENDS.items() if b.kernel is not None)
        raise UnsupportedModelError(
            f"attention implementation {implementation!r} has no capture backend in at2-rag (capturable: "
            f"{capturable}); switch the model with model.set_attn_implementation('sdpa') before attributing, or add "
            "an entry with at2_rag.capture.backends.register_backend"
        )
    if backend.kernel is not None:
        return backend.name
    assert backend.fallback is not None  # register_backend refuses an entry with neither
    return backend.fallback


def text_config(model: torch.nn.Module) -> Any:
    config: Any = model.config  # a transformers PretrainedConfig (nn.Module's attribute typing cannot say so)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(num_layers, num_query_heads) of a decoder: the estimator's feature grid."""
    config = text_config(model)
    return int(config.num_hidden_layers), int(config.num_attention_heads)


def install_capture(model: torch.nn.Module) -> None:
    """Route the model's attention through at2-rag's capturing function (a no-op outside a capture).

    sdpa and eager models keep their kernel (capture wraps it); flash, flex and paged attention cannot be wrapped
    and are switched to sdpa, with a warning naming the backend (`capture_backends()` lists every entry)."""
    current = attention_implementation(model)
    if current.startswith(CAPTURE_PREFIX):
        return
    base = capture_base(current)
    if base != current:
        logger.warning(
            "attention implementation %r cannot be captured (%s): at2-rag switched this model to %r. To go back "
            "after attributing: model.set_attn_implementation(%r)",
            current, _BACKENDS[current].reason, base, current,
        )
    pretrained: Any = model  # a transformers PreTrainedModel (nn.Module's attribute typing cannot see its methods)
    pretrained.set_attn_implementation(_register(base))
    if not attention_implementation(model).startswith(CAPTURE_PREFIX):
        # transformers keeps the old implementation (and logs why) for a model whose attention layers do not call
        # ALL_ATTENTION_FUNCTIONS.get_interface
        raise UnsupportedModelError(
            f"{type(model).__name__}'s attention does not go through transformers' AttentionInterface, "
            "so at2-rag cannot capture it"
        )


@contextlib.contextmanager
def paused_capture() -> Iterator[None]:
    """Inside the block no capture records attention calls: a pass of other work run between the decode steps
    of a captured generation (in its thread) leaves the capture as it was."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def capture_attention(
    model: torch.nn.Module,
    spans: Sequence[tuple[int, int]],
    capture_from: int,
    capture_to: int | None = None,
    left_padding: Sequence[int] | None = None,
    start_position: int = 0,
    row_spans: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> Iterator[CaptureState]:
    """Record attention to the sources (token spans `[start, end)`) for query positions in
    `[capture_from, capture_to)` during the block.

    `left_padding` (one count per batch row) declares a left-padded batch whose only mask is causal + padding
    (+ window); `start_position` is the number of positions already in the model's cache (a prefill done before
    the capture). `row_spans` gives each batch row sources of its own (`spans` is then ignored, pass `()`): row b's
    features are in columns `0..len(row_spans[b]) - 1`."""
    install_capture(model)
    num_layers, _ = model_shape(model)
    state = CaptureState(
        [(int(a), int(b)) for a, b in spans], capture_from, capture_to, num_layers,
        left_padding=None if left_padding is None else [int(p) for p in left_padding], start_position=start_position,
        row_spans=None if row_spans is None else [[(int(a), int(b)) for a, b in own] for own in row_spans],
    )
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def timed_capture(timings: CaptureTimings) -> Iterator[CaptureTimings]:
    """Clock capture's phases into `timings` during the block (one at a time; outside it capture pays nothing).

    The capturing functions are re-registered clocked under their own names through `AttentionInterface.register`,
    so a model already switched to capture is timed without being switched again."""
    from transformers import AttentionInterface

    if timing.current() is not None:
        raise RuntimeError("timed_capture is already active")
    originals = dict(_CAPTURING)
    timing.activate(timings)
    _KERNELS.clear()
    try:
        for name, fn in originals.items():
            AttentionInterface.register(name, timing.clocked(fn, timings, "attention", count=True))
        yield timings
    finally:
        for name, fn in originals.items():
            AttentionInterface.register(name, fn)
        timing.activate(None)
        _KERNELS.clear()
