"""The request shapes of the API and its JSON error body."""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field


class Turn(BaseModel):
    role: Literal["user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    question: str = ""
    history: list[Turn] = Field(default_factory=list)
    # True: sample another answer (temperature 0.8) instead of the greedy one, for Regenerate
    regenerate: bool = False


class StopRequest(BaseModel):
    stream_id: str


def error_response(status: int, kind: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message, **extra}, status_code=status)


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"

