"""LangChain messages as the role/content dicts a chat template expects."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.messages import BaseMessage

_ROLES = {
    "system": "system",
    "developer": "system",
    "human": "user",
    "user": "user",
    "ai": "assistant",
    "assistant": "assistant",
    "tool": "user",
    "function": "user",
}


def role_of(message: BaseMessage) -> str:
    role = getattr(message, "role", None) if message.type == "chat" else message.type
    return _ROLES.get(str(role), "user")


def text_of(message: BaseMessage) -> str:
    """The message's text blocks joined (images, documents and tool calls are not text)."""
    return message.text if isinstance(message.content, list) else str(message.content)


def to_chat_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    return [{"role": role_of(m), "content": text_of(m)} for m in messages]


def split_for_core(messages: Sequence[BaseMessage]) -> tuple[str | None, list[dict[str, str]], str]:
    """(system prompt or None, history, query) for the core's own template: the last human message is the
    query, leading system messages are the system prompt, the turns in between are the history."""
    turns = to_chat_dicts(messages)
    last_user = max((i for i, m in enumerate(messages) if role_of(m) == "user" and m.type != "tool"), default=None)
    if last_user is None:
        raise ValueError("with documents, the messages must contain a human message (the question)")
    system_parts: list[str] = []
    first = 0
    while first < last_user and turns[first]["role"] == "system":
        system_parts.append(turns[first]["content"])
        first += 1
    system = "\n\n".join(p for p in system_parts if p) if system_parts else None
    history = turns[first:last_user]
    query = turns[last_user]["content"]
    return system, history, query


def last_human_text(messages: Sequence[Any]) -> str:
    for m in reversed(messages):
        if isinstance(m, BaseMessage) and m.type == "human":
            return text_of(m)
    return ""
