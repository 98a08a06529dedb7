"""Stage 1's hand-off, `Prepared`: a request checked once and made into exactly what a run needs.

`Attributor.prepare` builds it from a request (at2-rag's own prompt) or from a prompt rendered elsewhere (the
documents located in it); every input check runs there, once, so the run and scoring stages trust it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInputError
from .answer import AnswerTokens
from .render import RenderedPrompt
from .sources import UnlocatedDocument


def check_max_new_tokens(max_new_tokens: Any) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    return max_new_tokens


def check_answer(answer: Any) -> str:
    if not isinstance(answer, str) or not answer.strip():
        raise InvalidInputError("answer must be a non-empty string")
    return answer


@dataclass(frozen=True)
class Prepared:
    """A checked request: the prompt with every source's token span, the question that labels the result, and
    either an answer produced elsewhere (attributed with one forward pass) or the settings to generate one."""

    prompt: RenderedPrompt
    query: str = ""
    answer: AnswerTokens | None = None
    max_new_tokens: int = 256
    generate_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def generates(self) -> bool:
        """True when the run generates the answer; False when it attributes the given one."""
        return self.answer is None

    @property
    def unlocated_documents(self) -> list[UnlocatedDocument]:
        """Documents of a prompt rendered elsewhere that were not found in it (with the reason)."""
        return list(self.prompt.unlocated_documents)

    def run_settings(self) -> tuple[Any, ...]:
        """What must be equal for two prepared requests to share one batch."""
        if self.answer is not None:
            return ("attribute",)
        try:
            frozen = tuple(sorted((k, repr(v)) for k, v in self.generate_kwargs.items()))
        except TypeError as exc:
            raise InvalidInputError(f"generate keyword arguments must have string names: {exc}") from exc
        return ("generate", self.max_new_tokens, frozen)
