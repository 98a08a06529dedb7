"""Ablation forward passes and their labels: the answer's log-odds with some sources attention-masked out.

Shared by collection (training labels) and evaluation (LDS, top-k drop, leave-one-out, surrogates).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)


def random_masks(num_sources: int, num_masks: int, keep_prob: float, generator: torch.Generator) -> torch.Tensor:
    """`[num_masks, num_sources]` bool, True = source kept; each source kept independently with `keep_prob`."""
    return torch.rand(num_masks, num_sources, generator=generator) < keep_prob


def ablation_attention_mask(
    seq_len: int, spans: Sequence[tuple[int, int]], masks: torch.Tensor
) -> torch.Tensor:
    """`[num_masks, seq_len]` attention mask: 0 on the tokens of every ablated source, 1 elsewhere.

    Positions are unchanged: an ablated source's tokens stay in the sequence but nothing attends to them.
    """
    out = torch.ones(masks.shape[0], seq_len, dtype=torch.long)
    for s, (a, b) in enumerate(spans):
        if b > a:
            out[~masks[:, s], a:b] = 0
    return out


# vocabulary entries worked on at once by `token_logit_probs` (64M floats, 256 MB): a batch of 64 ablation masks x
# 65 answer rows x a 262k vocabulary (Gemma 3) is 4.4 GB of logits, and working on it whole made two more copies
TOKEN_CHUNK_ELEMENTS = 1 << 26


def token_logit_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per token, the logit of its probability: correct logit minus logsumexp of all other logits.

    `logsigmoid` of it is log p and `logsigmoid(-x)` is log(1 - p), both without cancellation. Large inputs are
    worked on a few rows of the leading dimension at a time (each row's numbers are the same either way), so the
    temporary copies stay small next to the logits themselves.
    """
    if logits.dim() > 2 and logits.shape[0] > 1:
        rows = max(1, TOKEN_CHUNK_ELEMENTS // logits[0].numel())
        if rows < logits.shape[0]:
            return torch.cat([token_logit_probs(logits[i : i + rows], targets[i : i + rows])
                              for i in range(0, logits.shape[0], rows)])
    logits = logits.float()
    correct = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, targets.unsqueeze(-1), float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate across the whole range (Maechler 2012)."""
    x = x.clamp(max=-1e-15)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def target_log_odds(logit_probs: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """Log-odds of a target (its tokens `rows`): log p - log(1 - p), p = product of token probabilities."""
    selected = logit_probs[..., list(rows)].double()
    log_p = torch.nn.functional.logsigmoid(selected).sum(-1)
    return (log_p - log1mexp(log_p)).float()


def target_log_prob(logit_probs: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """log p of a target: the sum of its tokens' log-probabilities."""
    return torch.nn.functional.logsigmoid(logit_probs[..., list(rows)].double()).sum(-1).float()


@torch.no_grad()
def answer_logit_probs(
    model: Any,
    input_ids: Sequence[int],
    answer_len: int,
    attention_masks: torch.Tensor,
    batch_size: int = 8,
) -> torch.Tensor:
    """Teacher-forced per-token logit-probs of the answer (the last `answer_len` ids) under each mask.

    Returns `[num_masks, answer_len]`. Only the rows that predict answer tokens go through the LM head.
    """
    device = next(model.parameters()).device
    ids = torch.tensor(list(input_ids), device=device)
    n = ids.shape[0]
    answer = ids[n - answer_len :]
    positions = torch.arange(n, device=device)
    out = []
    for start in range(0, attention_masks.shape[0], batch_size):
        mask = attention_masks[start : start + batch_size].to(device)
        b = mask.shape[0]
        logits = model(
            input_ids=ids.expand(b, n),
            attention_mask=mask,
            position_ids=positions.expand(b, n),
            use_cache=False,
            logits_to_keep=answer_len + 1,
        ).logits[:, :-1]
        out.append(token_logit_probs(logits, answer.expand(b, answer_len)).cpu())
    return torch.cat(out, dim=0)


def cache_argument(model: Any) -> str:
    """The keyword `model.forward` / `generate` takes a KV cache by: transformers renamed `past_key_values` to
    `cache` during 5.x."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def full_attention_cache(model: Any) -> Any | None:
    """An empty KV cache for `model` when every layer keeps every position (no sliding window), else None.

    Prefix sharing reuses cached keys/values across masks; a sliding-window or recurrent layer would drop or
    fold positions, so such models take the full-pass path.
    """
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - exotic configs: no prefix sharing, never a failure
        return None
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    return cache


def prefix_sharing_cache(model: Any) -> Any | None:
    """An empty KV cache for prefix-shared ablations: `full_attention_cache`, or, for a model whose other layers
    only slide a window over positions (Gemma 2/3, Mistral, windowed Qwen 2), a cache that keeps every position in
    every layer. Ablation passes never drop a token (an ablated source keeps its place, masked), so the model's
    sliding-window mask, built over absolute positions, stays exact while the cache holds every key. Not for
    passes that drop tokens (measured groundedness compacts the prompt: windows count sequence positions)."""
    cache = full_attention_cache(model)
    if cache is not None:
        return cache
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

        layers = DynamicCache(config=model.config).layers
    except Exception:  # noqa: BLE001 - exotic configs: no prefix sharing, never a failure
        return None
    if not layers or any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers):
        return None
    return DynamicCache()  # without a config: a full DynamicLayer for every layer


def _prefix_segments(
    spans: Sequence[tuple[int, int]], seq_len: int, answer_len: int
) -> tuple[list[int], list[int]] | None:
    """Sources ordered by position and the segment ends (each source's end), or None if spans interleave.

    A token's hidden state depends only on the mask bits of the sources that end before it, so the prompt
    splits at source ends: segment k runs up to the end of the k-th source and is keyed by the bits of the
    k sources before it; the last segment (question and answer) depends on every bit.
    """
    order = sorted((s for s, (a, b) in enumerate(spans) if b > a), key=lambda s: spans[s][0])
    ends = []
    last_end = 0
    for s in order:
        a, b = spans[s]
        if a < last_end:
            return None  # overlapping sources (e.g. documents and their sentences together)
        ends.append(b)
        last_end = b
    if ends and seq_len - ends[-1] < answer_len + 1:
        return None  # a source reaches into the answer: the final segment must hold every predicting row
    return order, ends


@torch.no_grad()
def _shared_prefix_chunk(
    model: Any,
    ids: torch.Tensor,
    answer_len: int,
    spans: Sequence[tuple[int, int]],
    order: list[int],
    ends: list[int],
    keep: torch.Tensor,
    cache: Any,
) -> torch.Tensor:
    """Answer logit-probs of one chunk of masks, computing each distinct prompt prefix once."""
    device = ids.device
    cache_arg = cache_argument(model)
    n = ids.shape[0]
    bits = keep[:, order]  # [rows, ordered sources]
    num = bits.shape[0]
    parents = torch.zeros(num, dtype=torch.long)  # each mask's row in the current cache
    start = 0
    for k, end in enumerate(ends + [n]):
        final = k == len(ends)
        if final:
            patterns, row_of_mask = bits, torch.arange(num)
        elif k == 0:
            patterns, row_of_mask = bits[:1, :0], torch.zeros(num, dtype=torch.long)
        else:
            patterns, row_of_mask = torch.unique(bits[:, :k], dim=0, return_inverse=True)
        # the cache row of each new pattern: the row of any mask sharing it, one level up
        first_mask = torch.full((patterns.shape[0],), -1, dtype=torch.long)
        first_mask.scatter_reduce_(0, row_of_mask, torch.arange(num), reduce="amin", include_self=False)
        if k > 0:
            cache.batch_select_indices(parents[first_mask].to(device))
        rows = patterns.shape[0]
        attention = torch.ones(rows, end, dtype=torch.long)
        for j, s in enumerate(order[:k]):
            a, b = spans[s]
            attention[~patterns[:, j], a:b] = 0
        positions = torch.arange(start, end, device=device).expand(rows, end - start)
        out = model(
            input_ids=ids[start:end].expand(rows, end - start),
            attention_mask=attention.to(device),
            position_ids=positions,
            use_cache=True,
            **{cache_arg: cache},
            logits_to_keep=answer_len + 1 if final else 1,
        )
        parents = row_of_mask
        start = end
    logits = out.logits[:, :-1]
    return token_logit_probs(logits, ids[n - answer_len :].expand(num, answer_len)).cpu()


def ablated_answer_logit_probs(
    model: Any,
    input_ids: Sequence[int],
    answer_len: int,
    spans: Sequence[tuple[int, int]],
    masks: torch.Tensor,
    batch_size: int = 8,
    share_prefixes: bool = True,
) -> torch.Tensor:
    """`[num_masks, answer_len]` answer logit-probs with the sources where `masks` is False attention-masked.

    Same numbers as `answer_logit_probs` over `ablation_attention_mask` (up to float rounding), but masks are
    sorted so that each chunk of `batch_size` computes a prompt prefix once per distinct pattern of the bits
    before it: with documents ablated at random, the early documents are shared by most masks and the work
    drops roughly threefold. Sliding-window models share prefixes through a cache of every position
    (`prefix_sharing_cache`); overlapping sources use full passes.
    """
    seq_len = len(input_ids)
    segments = _prefix_segments(spans, seq_len, answer_len) if share_prefixes else None
    cache = prefix_sharing_cache(model) if segments is not None else None
    if segments is None or cache is None or not segments[0]:
        logger.debug("ablations without prefix sharing (overlapping sources, an unsupported cache or no sources)")
        return answer_logit_probs(
            model, input_ids, answer_len, ablation_attention_mask(seq_len, spans, masks), batch_size
        )
    order, ends = segments
    device = next(model.parameters()).device
    ids = torch.tensor(list(input_ids), device=device)
    # lexicographic order over the ordered bits keeps masks with a common prefix in the same chunk
    ordered_bits = masks[:, order].tolist()
    perm = torch.tensor(sorted(range(masks.shape[0]), key=lambda i: ordered_bits[i], reverse=True), dtype=torch.long)
    out = torch.empty(masks.shape[0], answer_len)
    for start in range(0, masks.shape[0], batch_size):
        idx = perm[start : start + batch_size]
        chunk_cache = cache if start == 0 else prefix_sharing_cache(model)
        out[idx] = _shared_prefix_chunk(model, ids, answer_len, spans, order, ends, masks[idx], chunk_cache)
    return out
