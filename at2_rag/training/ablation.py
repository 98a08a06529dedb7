"""Ablation forward passes and their labels: the answer's log-odds with some sources attention-masked out.

Shared by collection (training labels) and evaluation (LDS, top-k drop, leave-one-out, surrogates).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch


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


def token_logit_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per token, the logit of its probability: correct logit minus logsumexp of all other logits.

    `logsigmoid` of it is log p and `logsigmoid(-x)` is log(1 - p), both without cancellation.
    """
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
