"""Measured evidence: the answer's own log-probabilities with sources removed, measured by teacher-forced passes.

"How much does this answer sentence depend on the documents?" need not be estimated: it is one pass of the
answer with every document masked out of attention (positions unchanged, the ablations' convention), compared
with the answer's log-probabilities in the run itself. `grounded` is that drop in nats of the sentence's log-odds
(the quantity collection labels and the estimated head was fitted to).

For a model whose every layer attends to all earlier positions, removing a source's tokens from the sequence while
keeping every other token's position id is the same computation as masking them out of attention, and skips the
removed tokens' work: only the prompt outside the removed sources and the answer are run (13-15 % of a RAG
prompt). Models with sliding-window layers count their window in sequence positions, so they keep every token and
mask the removed ones (a full-length pass).

`RemovedSourcesPass` runs incrementally over a KV cache: `extend(new answer tokens)` costs only those tokens once
the prompt is in, so streaming can measure each sentence as it completes and the total is still one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..capture.masked import cache_argument, full_attention_cache, target_log_odds, token_logit_probs
from ..errors import InvalidInputError

GroundednessMode = Literal["measured", "estimated", "off"]
GROUNDEDNESS_MODES: tuple[str, ...] = ("measured", "estimated", "off")


def check_groundedness(mode: Any) -> GroundednessMode:
    """`groundedness` must be "measured" (one documents-free pass, exact), "estimated" (the estimator's zero-pass
    head) or "off"."""
    if mode not in GROUNDEDNESS_MODES:
        raise InvalidInputError(f"groundedness must be one of {', '.join(map(repr, GROUNDEDNESS_MODES))}, got {mode!r}")
    return mode


class RemovedSourcesPass:
    """Teacher-forced logit-probs of an answer after `prompt_ids` with the tokens of `spans` removed from attention.

    `extend(token_ids)` feeds the next answer tokens and returns their logit-probs `[len(token_ids)]`; the prompt
    is run on the first call, and every later call runs only its new tokens (KV cache). Calls must not overlap
    another use of the model (hold its lock; inside a capture, pause it)."""

    def __init__(
        self,
        model: Any,
        prompt_ids: Sequence[int],
        spans: Sequence[tuple[int, int]],
        prefix_cache: Any = None,
        prefix_length: int = 0,
    ) -> None:
        """`prefix_cache`: a KV cache of the first `prefix_length` prompt tokens (before every removed source), as
        the run itself computed them: used instead of computing them again (full-attention models only)."""
        self.model = model
        self.device = next(model.parameters()).device
        self._keep = torch.ones(len(prompt_ids), dtype=torch.bool)
        for a, b in spans:
            if not 0 <= a <= b <= len(prompt_ids):
                raise ValueError(f"span {(a, b)} is outside the prompt of {len(prompt_ids)} tokens")
            self._keep[a:b] = False
        self._prompt_ids = torch.tensor(list(prompt_ids), dtype=torch.long)
        self._cache = full_attention_cache(model)
        # full attention: drop the removed tokens instead of masking them, unless a removed source holds the
        # prompt's last token, whose row predicts the answer's first token (it must stay: mask it instead)
        self._compact = self._cache is not None and bool(self._keep[-1])
        self._skip = 0  # prompt tokens already in the cache
        if (
            self._compact
            and prefix_cache is not None
            and 0 < prefix_length < len(prompt_ids)
            and bool(self._keep[:prefix_length].all())
            and prefix_cache.get_seq_length() == prefix_length
        ):
            self._cache, self._skip = prefix_cache, prefix_length
        if self._cache is None:
            from transformers.cache_utils import DynamicCache

            self._cache = DynamicCache(config=model.config)
        self._cache_arg = cache_argument(model)
        self._next_position = len(prompt_ids)
        self._mask = self._keep.long() if not self._compact else None
        self._pending: torch.Tensor | None = None  # logits predicting the next answer token

    @torch.no_grad()
    def extend(self, token_ids: Sequence[int]) -> torch.Tensor:
        new = torch.tensor(list(token_ids), dtype=torch.long)
        if new.numel() == 0:
            return torch.zeros(0)
        positions = torch.arange(self._next_position, self._next_position + len(new))
        if self._pending is None:  # the first call runs the prompt too
            if self._compact:
                kept = torch.arange(len(self._prompt_ids))[self._keep][self._skip :]  # the shared prefix is cached
                ids = torch.cat([self._prompt_ids[kept], new])
                positions = torch.cat([kept, positions])
            else:
                ids = torch.cat([self._prompt_ids, new])
                positions = torch.arange(len(ids))
        else:
            ids = new
        if self._mask is not None:
            self._mask = torch.cat([self._mask, torch.ones(len(new), dtype=torch.long)])
            attention = self._mask
        else:
            attention = torch.ones(self._cache.get_seq_length() + len(ids), dtype=torch.long)  # type: ignore[union-attr]
        keep_logits = len(new) + (1 if self._pending is None else 0)
        logits = self.model(
            input_ids=ids.unsqueeze(0).to(self.device),
            attention_mask=attention.unsqueeze(0).to(self.device),
            position_ids=positions.unsqueeze(0).to(self.device),
            use_cache=True,
            logits_to_keep=keep_logits,
            **{self._cache_arg: self._cache},
        ).logits[0].float()
        if self._pending is not None:
            logits = torch.cat([self._pending.unsqueeze(0), logits])
        self._pending = logits[-1]
        self._next_position += len(new)
        return token_logit_probs(logits[:-1], new.to(logits.device)).cpu()


def removed_answer_logit_probs(
    model: Any, prompt_ids: Sequence[int], answer_ids: Sequence[int], spans: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """`[answer tokens]`: the answer's teacher-forced logit-probs with the tokens of `spans` removed (one pass)."""
    return RemovedSourcesPass(model, prompt_ids, spans).extend(answer_ids)


@dataclass
class GroundednessEvidence:
    """What the measured passes saw, per answer token: the logit-probs of the run itself (`kept`), with every
    document removed, and (in a conversation) with every earlier turn removed; `passes` counts the passes paid."""

    kept: torch.Tensor
    documents_removed: torch.Tensor | None = None
    turns_removed: torch.Tensor | None = None
    passes: int = 0

    def documents_drop(self, rows: Sequence[int]) -> float | None:
        """Nats: how much the target's (answer rows `rows`) log-odds drop when every document is removed."""
        return self._drop(self.documents_removed, rows)

    def turns_drop(self, rows: Sequence[int]) -> float | None:
        """Nats: how much the target's log-odds drop when every earlier turn is removed."""
        return self._drop(self.turns_removed, rows)

    def _drop(self, removed: torch.Tensor | None, rows: Sequence[int]) -> float | None:
        if removed is None or not rows:
            return None
        both = torch.stack([self.kept, removed])
        log_odds = target_log_odds(both, rows).double()
        return float(log_odds[0] - log_odds[1])


class MeasuredGroundedness:
    """The measured groundedness passes of one run, fed its answer as it grows: every document removed and, in a
    conversation, every earlier turn removed. `evidence(run)` runs only the answer tokens not fed yet, so a stream
    that measures each sentence as it completes still pays one pass of each kind in all. A run without its own
    answer logit-probs (a generation not recorded step by step) has them measured too, by one more pass."""

    def __init__(self, model: Any, prompt: Any, prefix_cache: Any = None, prefix_length: int = 0) -> None:
        """`prefix_cache`/`prefix_length`: the run's own KV cache of the prompt before its first document, which
        the documents-free pass shares (`Captured.prefix_cache`); it is extended in place."""
        turns = [span for part, span in zip(prompt.context_parts, prompt.context_token_spans) if part.kind == "history"]
        documents = RemovedSourcesPass(model, prompt.input_ids, prompt.doc_token_spans, prefix_cache, prefix_length)
        self._passes: dict[str, RemovedSourcesPass] = {"documents": documents}
        if turns:
            self._passes["turns"] = RemovedSourcesPass(model, prompt.input_ids, turns)
        self._model, self._prompt_ids = model, prompt.input_ids
        self._fed = 0
        self._measured: dict[str, list[torch.Tensor]] = {name: [] for name in self._passes}

    def evidence(self, run: Any) -> GroundednessEvidence:
        """The evidence for `run` (this prompt, an answer that extends what was fed before). Hold the model's
        lock (inside a captured generation: pause the capture and the logit recorder)."""
        tokens = run.answer.token_ids
        if len(tokens) < self._fed:
            raise ValueError(f"the answer has {len(tokens)} tokens, {self._fed} were already measured")
        if run.answer_logit_probs is None and "kept" not in self._passes:
            if self._fed:
                raise ValueError("the run lost its own answer logit-probs after part of it was measured")
            self._passes["kept"] = RemovedSourcesPass(self._model, self._prompt_ids, [])
            self._measured["kept"] = []
        new = tokens[self._fed :]
        if new:
            for name, measuring in self._passes.items():
                self._measured[name].append(measuring.extend(new))
            self._fed = len(tokens)
        joined = {name: torch.cat(parts) if parts else torch.zeros(0) for name, parts in self._measured.items()}
        return GroundednessEvidence(
            kept=joined["kept"] if "kept" in joined else run.answer_logit_probs,
            documents_removed=joined["documents"],
            turns_removed=joined.get("turns"),
            passes=len(self._passes),
        )
