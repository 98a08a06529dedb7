"""Per-request controls of a generation that also hold for one row of a batch: stop this row now (the others go
on), and hand this row's text to its caller as it is generated. A server uses them to cancel an answer nobody
waits for and to stream batched answers token by token (`MicroBatcher.submit(stop=..., on_text=...)`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunHooks:
    """`should_stop()` is asked between decode steps: True ends this request's answer there (a batch's other rows
    go on) with `finish_reason="stopped"`. `on_text(chunk)` receives the answer's text as it is generated, in the
    generation thread, a word at a time (the chunks join to the answer's text, as in a single stream)."""

    should_stop: Callable[[], bool] | None = None
    on_text: Callable[[str], None] | None = None


class RowControl:
    """The stopping criterion and the streamer that carry each row's hooks into one `model.generate` call."""

    def __init__(
        self, tokenizer: Any, hooks: Sequence[RunHooks | None], prompt_width: int, eos_token_ids: Iterable[int]
    ) -> None:
        self.tokenizer = tokenizer
        self.hooks = list(hooks)
        self.prompt_width = prompt_width
        self.eos = frozenset(eos_token_ids)
        self.ended_at: list[int | None] = [None] * len(self.hooks)  # answer tokens a stopped row kept
        self._tokens: list[list[int]] = [[] for _ in self.hooks]
        self._done = [False] * len(self.hooks)
        self._sent = [0] * len(self.hooks)
        self._prompt_seen = False

    @property
    def stops(self) -> bool:
        """Some row may be stopped: the criterion is needed."""
        return any(h is not None and h.should_stop is not None for h in self.hooks)

    @property
    def streams(self) -> bool:
        """Some row wants its text: the streamer is needed (decoding every step costs nothing otherwise)."""
        return any(h is not None and h.on_text is not None for h in self.hooks)

    def stopped(self, row: int) -> bool:
        return self.ended_at[row] is not None

    # ---- the stopping criterion: asked after every step with the whole batch's ids ----------------------------
    def criterion(self) -> Any:
        from transformers import StoppingCriteria

        control = self

        class StopRows(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                return control._stop_rows(input_ids)

        return StopRows()

    def _stop_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        generated = input_ids.shape[1] - self.prompt_width
        for row, hooks in enumerate(self.hooks):
            if self.ended_at[row] is None and hooks is not None and hooks.should_stop is not None:
                if hooks.should_stop():
                    self.ended_at[row] = generated
        return torch.tensor([e is not None for e in self.ended_at], dtype=torch.bool, device=input_ids.device)

    # ---- the streamer: `put` gets the prompt once, then each step's new token of every row -------------------
    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.hooks), -1)[:, -1].tolist()):
            if self._done[row]:
                continue
            if token in self.eos:
                self._done[row] = True
                continue
            self._tokens[row].append(token)
            ended = self.ended_at[row]
            if ended is not None and len(self._tokens[row]) >= ended:
                self._done[row] = True
            self._emit(row, final=False)

    def end(self) -> None:
        for row in range(len(self.hooks)):
            self._emit(row, final=True)

    def _emit(self, row: int, final: bool) -> None:
        hooks = self.hooks[row]
        if hooks is None or hooks.on_text is None:
            return
        text = self.tokenizer.decode(self._tokens[row], skip_special_tokens=True)
        if final or text.endswith("\n"):
            upto = len(text)
        elif text.endswith("\ufffd"):  # a character still incomplete
            return
        else:  # up to the last space: a word still growing could decode differently
            upto = text.rfind(" ") + 1
        if upto > self._sent[row]:
            chunk, self._sent[row] = text[self._sent[row] : upto], upto
            try:
                hooks.on_text(chunk)
            except Exception:  # noqa: BLE001 - one caller's callback must not end the batch's generation
                logger.exception("on_text of batch row %d failed", row)


class TeeStreamer:
    """Several streamers fed the same calls (a caller's streamer and the rows' controls)."""

    def __init__(self, *streamers: Any) -> None:
        self.streamers = [s for s in streamers if s is not None]

    def put(self, value: torch.Tensor) -> None:
        for streamer in self.streamers:
            streamer.put(value)

    def end(self) -> None:
        for streamer in self.streamers:
            streamer.end()
