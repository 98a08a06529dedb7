"""Stage 2's hand-off, `Captured`: what one run of the model produced, and the per-model lock that serialises
runs (a capture records every attention call made while it is active)."""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from ..prompting.answer import AnswerTokens
from ..prompting.render import RenderedPrompt


@dataclass
class Captured:
    """Everything one model run produced: the prompt, the answer, per-token features `[T, S, L*H]`
    (sources = documents, then their sentences, then the context parts) and the model's own logit-prob of each
    answer token in this run (`[T]`, the unmasked side of measured groundedness; None without capture)."""

    prompt: RenderedPrompt
    answer: AnswerTokens
    token_features: torch.Tensor
    finish_reason: str | None = None
    answer_logit_probs: torch.Tensor | None = None
    # the generation's KV cache of the prompt before its first document (positions a documents-free pass shares;
    # only a lone captured generation on a full-attention model keeps it), and its length
    prefix_cache: Any = field(default=None, repr=False, compare=False)
    prefix_length: int = 0
    query: str = ""  # the question the run answers (labels the Attribution)

    @property
    def num_documents(self) -> int:
        return len(self.prompt.doc_sources)


_MODEL_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: torch.nn.Module) -> threading.RLock:
    """One lock per model (kept off the model so it can still be copied or pickled): runs on one model are
    serialised, since a capture records every attention call made while it is active."""
    with _LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock
