"""The model's own logit-prob of each token it generates, recorded during generation (no extra pass): the
unmasked side of measured groundedness and of every ablation label."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .masked import token_logit_probs


class GeneratedLogitProbs:
    """Records, while `model.generate` runs inside the block, the model's own logit-prob of every token it
    generates: the unmasked side of the measured drop, at no extra pass.

    A forward hook reads the raw logits of each step's last position (before any logits processor or sampling
    warper), and scores them once the next step's input reveals the chosen token; `finish(tokens)` scores the
    last step. Only one row of logits per batch row is held at a time. A generation that is not one token per
    step and row (beam search, assisted decoding) is not recorded: `finish` returns None and the caller measures
    the answer with a teacher-forced pass instead."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._steps: list[torch.Tensor] = []  # [batch] per generated token but the last
        self._pending: torch.Tensor | None = None
        self._handle: Any = None
        self._paused = False
        self._valid = True

    def __enter__(self) -> GeneratedLogitProbs:
        self._handle = self.model.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward passes inside the block are not the generation's steps (a measured pass between them)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def _hook(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if self._paused:
            return
        logits = output.logits if hasattr(output, "logits") else output[0]
        if self._pending is not None:
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            if ids is None or ids.shape != (self._pending.shape[0], 1):
                self._valid = False  # not one chosen token per row and step
                return
            chosen = ids[:, -1].to(self._pending.device)
            self._steps.append(token_logit_probs(self._pending, chosen).cpu())
        self._pending = logits[:, -1].detach().float()

    def finish(self, generated: torch.Tensor) -> torch.Tensor | None:
        """`[batch, steps]` logit-probs of `generated` (`[batch, steps]`, the tokens generate returned after the
        prompt); None when the generation was not recorded step by step."""
        if not self._valid or (self._pending is not None and self._pending.shape[0] != generated.shape[0]):
            return None
        steps = list(self._steps)
        if self._pending is not None and generated.shape[1] > len(steps):
            steps.append(token_logit_probs(self._pending, generated[:, len(steps)].to(self._pending.device)).cpu())
        if not steps:
            return torch.zeros(generated.shape[0], 0)
        return torch.stack(steps, dim=1)[:, : generated.shape[1]]
