"""One request object: what a caller asks at2-rag to attribute (query, documents, history, system prompt, answer)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import InvalidInputError


class TemplateDefault:
    """The type of `TEMPLATE_DEFAULT`: "use the prompt template's own system prompt" (None means no system prompt)."""

    _instance: TemplateDefault | None = None

    def __new__(cls) -> TemplateDefault:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "TEMPLATE_DEFAULT"

    def __reduce__(self) -> str:
        return "TEMPLATE_DEFAULT"


#: `system_prompt=TEMPLATE_DEFAULT` keeps the template's system prompt; a string replaces it; None removes it
TEMPLATE_DEFAULT = TemplateDefault()

SystemPrompt = str | None | TemplateDefault


class AttributionRequest(BaseModel):
    """A question over documents, with the conversation so far, and optionally an answer produced elsewhere.

    `documents` are anything `at2_rag.prompting.sources.to_document` accepts; `history` is earlier turns (role/content
    dicts or framework messages). With `answer` set the answer is attributed with one forward pass; without it,
    the answer is generated with capture.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    query: str
    documents: list[Any]
    history: list[Any] = Field(default_factory=list)
    system_prompt: SystemPrompt = TEMPLATE_DEFAULT
    answer: str | None = None

    @field_validator("documents", "history", mode="before")
    @classmethod
    def _a_list(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, (str, bytes, Mapping)):
            raise ValueError("must be a list (wrap a single item in a list)")
        return list(value) if isinstance(value, tuple) else value

    @classmethod
    def coerce(cls, value: AttributionRequest | Mapping[str, Any], position: int | None = None) -> AttributionRequest:
        """A request from a request or a dict with the same keys; a clear `InvalidInputError` otherwise."""
        if isinstance(value, AttributionRequest):
            return value
        where = "" if position is None else f"request {position}: "
        if not isinstance(value, Mapping):
            raise InvalidInputError(
                f"{where}expected an AttributionRequest or a dict with query/documents/history/system_prompt/answer,"
                f" got {type(value).__name__}"
            )
        try:
            return cls(**dict(value))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors())
            raise InvalidInputError(f"{where}{problems}") from exc
        except TypeError as exc:  # keys that are not strings
            raise InvalidInputError(f"{where}{exc}") from exc
