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
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from ..errors import UnsupportedModelError

logger = logging.getLogger(__name__)

CAPTURE_PREFIX = "at2_capture_"
ROW_BLOCK = 64  # decode steps whose query rows share one allocation
ROWS_PER_PACK = 8  # decode rows held as the model's tensors before one copy packs them (divides ROW_BLOCK)
_NORMAL_RANGE = (1e-30, 1e37)  # softmax denominators summed without a max shift must land inside this

_ACTIVE: contextvars.ContextVar[CaptureState | None] = contextvars.ContextVar("at2_capture_state", default=None)


@dataclass
class CaptureState:
    """What one capture records: per layer, a list of `[batch, rows, sources, heads]` tensors (heads split as
    `[..., key heads, query heads per key head]` for rows reduced from deferred queries)."""

    spans: list[tuple[int, int]]  # token span [start, end) of every source, in absolute positions
    capture_from: int  # first absolute query position recorded
    capture_to: int | None  # exclusive; None = no end
    num_layers: int
    # a left-padded batch: row b's first left_padding[b] keys are padding. The model's mask is then known to be
    # causal + padding (+ window), so rows are deferred as without a mask and the padding is masked at the read
    left_padding: list[int] | None = None
    start_position: int = 0  # positions already in the model's cache when the capture starts
    # a batch whose rows have sources of their own (`spans` unused): row b's spans, its features in columns
    # 0..len-1 (zeros after). Each row reduces against its own spans only, not every row's
    row_spans: list[list[tuple[int, int]]] | None = None
    seen: list[int] = field(default_factory=list)
    rows: list[list[torch.Tensor]] = field(default_factory=list)
    pending: list[_PendingRows | None] = field(default_factory=list)
    _bounds: dict[Any, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _row_blocks: list[list[torch.Tensor]] = field(default_factory=list)  # block, layer: [B, H, ROW_BLOCK, D]
    _rows_kept: list[int] = field(default_factory=list)  # decode rows packed into _row_blocks, per layer
    _module_windows: dict[int, int | None] = field(default_factory=dict)  # layer -> module's sliding window
    _segments: dict[Any, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)
    _hidden: dict[Any, torch.Tensor] = field(default_factory=dict)  # masks shared by the layers of one read

    def __post_init__(self) -> None:
        self.seen = [self.start_position] * self.num_layers
        self._rows_kept = [0] * self.num_layers
        self.rows = [[] for _ in range(self.num_layers)]
        self.pending = [None] * self.num_layers
        if self.row_spans is not None and self.left_padding is not None and len(self.row_spans) != len(
            self.left_padding
        ):
            raise ValueError(f"{len(self.row_spans)} rows of spans for {len(self.left_padding)} padded rows")
        for spans in [self.spans] if self.row_spans is None else self.row_spans:
            for a, b in spans:
                if a < 0 or b < a:
                    raise ValueError(f"invalid source span ({a}, {b})")

    @property
    def num_sources(self) -> int:
        """Columns of the features: the sources, or the most any row has."""
        if self.row_spans is None:
            return len(self.spans)
        return max((len(spans) for spans in self.row_spans), default=0)

    def spans_of(self, row: int | None) -> list[tuple[int, int]]:
        """The spans batch row `row` reduces against (None: the spans every row shares)."""
        if self.row_spans is None or row is None:
            return self.spans
        return self.row_spans[row]

    def check_rows(self, batch: int) -> None:
        if self.row_spans is not None and len(self.row_spans) != batch:
            raise ValueError(f"the capture has spans for {len(self.row_spans)} rows but the batch has {batch}")

    def bounds(self, device: torch.device, row: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Span starts and ends as tensors on `device` (built once per device and row)."""
        if (device, row) not in self._bounds:
            spans = self.spans_of(row)
            starts = torch.tensor([a for a, _ in spans], dtype=torch.long, device=device)
            ends = torch.tensor([b for _, b in spans], dtype=torch.long, device=device)
            self._bounds[device, row] = (starts, ends)
        return self._bounds[device, row]

    def reduce(self, probs: torch.Tensor, key_start: int) -> torch.Tensor:
        """Sum attention over every source's keys: `[B, H, T, K]` -> `[B, H, T, S]` (calls reduced at once).

        Prefix sums make each source's sum a difference of two entries: O(K + S) per row instead of
        an O(K x S) product, and a key window that starts late (sliding-window caches) just clips the spans.
        """
        prefix = probs.cumsum(-1)  # fp32: ~1e-7 error
        if self.row_spans is None:
            return self._span_sums(prefix, None, key_start)
        self.check_rows(prefix.shape[0])
        out = prefix.new_zeros(*prefix.shape[:-1], self.num_sources)
        for row in range(prefix.shape[0]):
            sums = self._span_sums(prefix[row], row, key_start)
            out[row, ..., : sums.shape[-1]] = sums
        return out

    def _span_sums(self, prefix: torch.Tensor, row: int | None, key_start: int) -> torch.Tensor:
        k_len = prefix.shape[-1]
        starts, ends = self.bounds(prefix.device, row)
        lo = (starts - key_start).clamp(0, k_len)
        hi = (ends - key_start).clamp(0, k_len)
        # sum over [lo, hi) = prefix[hi - 1] - prefix[lo - 1], with prefix[-1] = 0
        upper = prefix[..., (hi - 1).clamp(min=0)] * (hi > 0)
        lower = prefix[..., (lo - 1).clamp(min=0)] * (lo > 0)
        return upper - lower

    def defer(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, first_position: int,
        scaling: float, softcap: float | None, window: int | None,
    ) -> None:
        """Keep query rows (positions `first_position`...) and the layer's newest keys for `flush`.

        A decode step's row is kept as the model's own tensor, and every ROWS_PER_PACK such rows are packed into a
        block shared by all layers: one copy per pack instead of one per step (each tensor op on a decode step
        costs tens of microseconds in place, the model having just streamed its weights through the caches).
        """
        pending = self.pending[layer]
        if pending is None:
            pending = self.pending[layer] = _PendingRows([], first_position, key, scaling, softcap, window)
        self._append_rows(layer, pending, query, key)

    def keep_decode_row(self, layer: int | None, query: torch.Tensor, key: torch.Tensor) -> bool:
        """A decode step's row for a layer already deferring rows, kept with as little work as possible (the path
        of all but one call per layer in a generation); False where the general path must decide."""
        if type(layer) is not int or not 0 <= layer < self.num_layers:
            return False
        pending = self.pending[layer]
        if pending is None:
            return False
        start = self.seen[layer]
        if key.shape[2] != start + 1 or (self.capture_to is not None and start >= self.capture_to):
            return False  # keys not from position 0, or past the captured rows
        self.seen[layer] = start + 1
        self._append_rows(layer, pending, query, key)
        return True

    def _append_rows(self, layer: int, pending: _PendingRows, query: torch.Tensor, key: torch.Tensor) -> None:
        """Queue query rows after a layer's earlier ones, keep its newest keys, pack loose decode rows when due."""
        pending.queries.append(query)
        if _TIMINGS is None:
            pending.keys = key  # the cache's newest tensor holds every earlier key too
        else:
            t = time.perf_counter()  # replacing the previous step's keys frees them: clocked apart
            pending.keys = key
            _TIMINGS.release += time.perf_counter() - t
        if query.shape[2] == 1:
            pending.loose += 1
            if pending.loose == ROWS_PER_PACK:
                self._pack_rows(layer, pending)

    def _pack_rows(self, layer: int, pending: _PendingRows) -> None:
        """Copy a layer's loose decode rows into the block shared by all layers; the block's view replaces them.

        Keeping the model's own small per-step tensors alive for the whole answer would pin thousands of little
        allocations between the KV cache's growing blocks and fragment the heap (measured: up to +30 % peak RSS
        at 2k tokens); rows held for a few steps, then one block per ROW_BLOCK steps for every layer at once, keep
        the heap as plain generation leaves it.
        """
        count, pending.loose = pending.loose, 0
        loose = pending.queries[-count:]
        del pending.queries[-count:]
        index, offset = divmod(self._rows_kept[layer], ROW_BLOCK)
        if index == len(self._row_blocks):  # the first layer to reach a new block allocates it for every layer
            b, h, _, d = loose[0].shape
            self._row_blocks.append(list(loose[0].new_empty(self.num_layers, b, h, ROW_BLOCK, d).unbind(0)))
        target = self._row_blocks[index][layer].narrow(2, offset, count)
        shape = loose[0].shape
        if target.shape[:2] != shape[:2] or target.shape[3] != shape[3] or target.dtype != loose[0].dtype:
            pending.queries.append(torch.cat(loose, dim=2))  # a layer shaped unlike the first one: keep it apart
            return
        self._rows_kept[layer] += count
        pending.queries.append(torch.cat(loose, dim=2, out=target))

    def module_window(self, layer: int, module: torch.nn.Module) -> int | None:
        """The attention module's own sliding window, looked up once per layer (a missing attribute costs an
        exception inside nn.Module on every decode step otherwise)."""
        if layer not in self._module_windows:
            self._module_windows[layer] = getattr(module, "sliding_window", None)
        return self._module_windows[layer]

    def key_segments(
        self, k_len: int, device: torch.device, row: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Keys 0..k_len-1 cut at every source boundary (of `row`'s sources): each key's segment, each source's
        first and end segment (a source is the run of segments between them), and the number of segments. Built
        once per key length and row."""
        cache_key = (k_len, device, row)
        if cache_key not in self._segments:
            clipped = [(min(a, k_len), min(b, k_len)) for a, b in self.spans_of(row)]
            edges = sorted({0, k_len, *(x for span in clipped for x in span)})
            index = {x: i for i, x in enumerate(edges)}
            segment_of_key = torch.searchsorted(
                torch.tensor(edges[1:], device=device), torch.arange(k_len, device=device), right=True
            )
            first = torch.tensor([index[a] for a, _ in clipped], dtype=torch.long, device=device)
            end = torch.tensor([index[b] for _, b in clipped], dtype=torch.long, device=device)
            self._segments[cache_key] = (segment_of_key, first, end, len(edges) - 1)
        return self._segments[cache_key]

    def hidden_keys(self, first: int, rows: int, k_len: int, window: int | None, device: torch.device) -> torch.Tensor:
        """Bool `[keys, 1, rows]`, True where a row may not see a key; the keys run from `first + 1` (from 0 with
        a window). Shared by every layer of one read, built once."""
        cache_key = (first, rows, k_len, window, device)
        if cache_key not in self._hidden:
            q_pos = torch.arange(first, first + rows, device=device)
            k_pos = torch.arange(0 if window else first + 1, k_len, device=device)
            self._hidden[cache_key] = (~_visible(q_pos, k_pos, window)).T[:, None, :]  # [keys, 1, rows]
        return self._hidden[cache_key]

    def flush(self, layer: int, workspace: _Workspace | None = None) -> None:
        """Reduce a layer's deferred rows against the keys kept for them (scratch from `workspace`, shared by the
        layers of one read; a flush on its own frees its scratch when it returns).

        Scores are laid out keys-major (`[B, KVH, K, rows]`, each key's rows contiguous): BLAS runs K @ Q^T
        faster than Q @ K^T for these shapes, and the softmax numerators then add up per source segment with one
        `index_add_` over whole rows (vectorised) instead of a prefix sum along every row.
        """
        pending = self.pending[layer]
        if pending is None:
            return
        self.pending[layer] = None
        take = (workspace or _Workspace()).take
        with torch.no_grad():
            query = torch.cat(pending.queries, dim=2) if len(pending.queries) > 1 else pending.queries[0]
            key = pending.keys
            b, h, t, _ = query.shape
            k_len = key.shape[2]
            # bound the fp32 [B, KVH, K, rows] block to ~64 MiB however long the answer is
            step = max(1, (64 << 20) // max(1, 4 * b * h * k_len))
            for lo in range(0, t, step):
                chunk = (query[:, :, lo : min(t, lo + step)], key, pending, pending.first_position + lo, take)
                shares = self._source_shares(*chunk, shifted=False)
                if shares is None:  # a score outside exp's fp32 range: the max-shifted softmax instead
                    shares = self._source_shares(*chunk, shifted=True)
                assert shares is not None  # the max-shifted softmax always fits fp32
                self.rows[layer].append(shares)

    def _source_shares(
        self, query: torch.Tensor, key: torch.Tensor, pending: _PendingRows, first: int,
        take: Callable[..., torch.Tensor], shifted: bool,
    ) -> torch.Tensor | None:
        """Softmax mass of every source for query rows at positions `first`...: `[B, rows, S, KVH, rep]` (heads
        in query order once the last two dims are merged).

        Unshifted (`shifted=False`), the numerators are plain exp(score): exact while every row's denominator
        stays inside fp32's normal range, which is checked (None when it does not), and two passes over the
        `[K, rows]` block cheaper than subtracting each row's max first.
        """
        b, h, rows, d = query.shape
        kvh, k_len = key.shape[1], key.shape[2]
        rep = h // kvh
        shape = (b, kvh, k_len, rep * rows)
        q = query.reshape(b, kvh, rep * rows, d) * pending.scaling  # columns: (head in group, row)
        raw = torch.matmul(key, q.transpose(-1, -2), out=take(0, shape, query.dtype, key.device))
        scores = raw if raw.dtype == torch.float32 else take(1, shape, torch.float32, key.device).copy_(raw)
        if pending.softcap is not None:
            scores.div_(pending.softcap).tanh_().mul_(pending.softcap)
        by_row = scores.view(b, kvh, k_len, rep, rows)
        if self.left_padding is not None:
            for row, pad in enumerate(self.left_padding):
                if pad:
                    by_row[row, :, :pad].fill_(float("-inf"))
        if pending.window:
            by_row.masked_fill_(self.hidden_keys(first, rows, k_len, pending.window, key.device), float("-inf"))
        elif first < k_len - 1:  # keys after the first row are future keys for some rows: mask only those
            hidden = self.hidden_keys(first, rows, k_len, None, key.device)
            by_row[:, :, first + 1 :].masked_fill_(hidden, float("-inf"))
        weights = (scores.sub_(scores.amax(2, keepdim=True)) if shifted else scores).exp_()  # numerators, in place
        if self.row_spans is None:
            shares = self._segment_shares(weights, None, take, shifted)
        else:  # each row against its own sources: a batch of 8 reads 1/8 of the columns of all rows' sources
            self.check_rows(b)
            shares = weights.new_zeros(b, kvh, self.num_sources, rep * rows)  # kept: not workspace scratch
            for row in range(b):
                own = self._segment_shares(weights[row : row + 1], row, take, shifted)
                if own is None:
                    return None
                shares[row : row + 1, :, : own.shape[2]] = own
        if shares is None:
            return None
        return shares.view(b, kvh, shares.shape[2], rep, rows).permute(0, 4, 2, 1, 3)

    def _segment_shares(
        self, weights: torch.Tensor, row: int | None, take: Callable[..., torch.Tensor], shifted: bool
    ) -> torch.Tensor | None:
        """Softmax numerators `[B, KVH, K, R]` -> each source's share `[B, KVH, S, R]` (`row`'s sources, or the
        shared ones); None when unshifted numerators left a denominator outside fp32's normal range."""
        b, kvh, k_len, r = weights.shape
        segment_of_key, first_segment, end_segment, num_segments = self.key_segments(k_len, weights.device, row)
        # totals[:, :, j] = sum of segments before j; totals[:, :, -1] = the row's softmax denominator
        totals = take(2, (b, kvh, num_segments + 1, r), torch.float32, weights.device).zero_()
        totals[:, :, 1:].index_add_(2, segment_of_key, weights).cumsum_(2)
        denominator = totals[:, :, -1:]
        if not shifted:
            smallest, largest = torch.aminmax(denominator)
            if not (_NORMAL_RANGE[0] < smallest.item() and largest.item() < _NORMAL_RANGE[1]):
                return None
        shares = totals.index_select(2, end_segment).sub_(totals.index_select(2, first_segment))
        return shares.div_(denominator)  # [B, KVH, S, R]

    def features(self) -> torch.Tensor:
        """`[batch, rows, sources, layers * heads]`, heads ordered layer-major (as the reference package).

        Each layer is reduced and copied straight into its slot of the result; its rows are then kept as a view
        of that slot, so the features exist once in memory, and a second call returns the same values.
        """
        if _TIMINGS is None:
            return self._features()
        t = time.perf_counter()
        try:
            return self._features()
        finally:
            _TIMINGS.read += time.perf_counter() - t

    def _features(self) -> torch.Tensor:
        workspace = _Workspace()
        out: torch.Tensor | None = None
        missing, lengths = [], set()
        for layer in range(self.num_layers):
            self.flush(layer, workspace)
            chunks = self.rows[layer]
            if not chunks:
                missing.append(layer)
                continue
            total = sum(c.shape[1] for c in chunks)
            lengths.add(total)
            if out is None:
                heads = math.prod(chunks[0].shape[3:])
                out = chunks[0].new_empty(chunks[0].shape[0], total, self.num_sources, self.num_layers, heads)
            if total != out.shape[1]:
                continue  # reported below with every layer's count
            slot, row = out[:, :, :, layer], 0
            for chunk in chunks:
                target = slot[:, row : row + chunk.shape[1]]
                (target if chunk.dim() == 4 else target.unflatten(-1, chunk.shape[3:])).copy_(chunk)
                row += chunk.shape[1]
            self.rows[layer] = [slot]
        if missing:
            raise UnsupportedModelError(
                f"no attention was captured for layers {missing[:8]}{'...' if len(missing) > 8 else ''}: this "
                "model's attention does not go through transformers' AttentionInterface for every layer"
            )
        if len(lengths) != 1 or out is None:
            raise UnsupportedModelError(f"layers captured different numbers of rows {sorted(lengths)}")
        b, t, s, layers, h = out.shape
        return out.view(b, t, s, layers * h)


class _Workspace:
    """Scratch buffers reused by every layer of one read.

    A fresh tensor for each layer's `[B, KVH, K, rows]` block (15 MB at 6k keys) is a fresh mapping on a CPU whose
    pages fault in as it is written (measured at 6.4k keys, 30 layers: the matmul alone 0.35 s -> 0.24 s).
    """

    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}

    def take(self, slot: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffers[slot] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


@dataclass
class _PendingRows:
    """Captured query rows of one layer not yet reduced, with the keys they attend to."""

    queries: list[torch.Tensor]  # each [B, H, rows, D], consecutive positions
    first_position: int
    keys: torch.Tensor  # [B, KVH, K, D], positions 0..K-1
    scaling: float
    softcap: float | None
    window: int | None
    loose: int = 0  # trailing decode rows still held as the model's own tensors


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[rows, keys] bool: causal, and inside the sliding window when there is one."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    return allowed


def _softmax_(scores: torch.Tensor) -> torch.Tensor:
    """In-place fp32 softmax over the last dim (fresh same-sized temporaries would fragment the heap)."""
    probs = scores.sub_(scores.amax(-1, keepdim=True)).exp_()
    return probs.div_(probs.sum(-1, keepdim=True))


# ---- attention backends ---------------------------------------------------------------------------------
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
        if _TIMINGS is not None:
            kernel = _clocked(kernel, _TIMINGS, "kernel")
        _KERNELS[cache_key] = kernel
    return kernel


# ---- timing hook (bench/overhead.py) ----------------------------------------------------------------------
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


_TIMINGS: CaptureTimings | None = None


def _clocked(fn: Callable[..., Any], timings: CaptureTimings, phase: str, count: bool = False) -> Callable[..., Any]:
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


@contextlib.contextmanager
def timed_capture(timings: CaptureTimings) -> Iterator[CaptureTimings]:
    """Clock capture's phases into `timings` during the block (one at a time; outside it capture pays nothing).

    The capturing functions are re-registered clocked under their own names through `AttentionInterface.register`,
    so a model already switched to capture is timed without being switched again."""
    global _TIMINGS
    from transformers import AttentionInterface

    if _TIMINGS is not None:
        raise RuntimeError("timed_capture is already active")
    originals = dict(_CAPTURING)
    _TIMINGS = timings
    _KERNELS.clear()
    try:
        for name, fn in originals.items():
            AttentionInterface.register(name, _clocked(fn, timings, "attention", count=True))
        yield timings
    finally:
        for name, fn in originals.items():
            AttentionInterface.register(name, fn)
        _TIMINGS = None
        _KERNELS.clear()


def _grouped_scores(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """QK^T for query heads sharing key heads (GQA) without copying the keys: [B, H, T, K]."""
    b, h, t, d = query.shape
    kvh = key.shape[1]
    q = query.reshape(b, kvh, (h // kvh) * t, d) * scaling  # scale the few query rows, not the K scores
    scores = torch.matmul(q, key.transpose(-1, -2))  # BLAS reads the transposed cache in place
    return scores.reshape(b, h, t, key.shape[2])


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
            "an entry with at2_rag.capture.attention.register_backend"
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
