"""LangChain messages as the role/content dicts a chat template expects (via `convert_to_openai_messages`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.messages import BaseMessage, convert_to_openai_messages

from at2_rag import InvalidInputError

#: OpenAI roles -> the roles a chat template knows (tool results are read as user turns, as before)
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

#: user-role turns that are results, not questions
_NOT_ASKED = ("tool", "function")


def to_chat_dict(message: BaseMessage) -> dict[str, str]:
    """`convert_to_openai_messages(message, text_format="string")` reduced to role + string content.

    Content OpenAI's format has no string for (documents, images) keeps its text blocks (`message.text`)."""
    try:
        converted = convert_to_openai_messages(message, text_format="string")
    except ValueError:  # e.g. text-plain document blocks: not an OpenAI block type
        converted = {"role": "user" if message.type == "human" else message.type, "content": message.text}
    content = converted.get("content")
    return {
        "role": _ROLES.get(str(converted.get("role")), "user"),
        "content": content if isinstance(content, str) else message.text,
    }


def to_chat_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    return [to_chat_dict(m) for m in messages]


def split_for_core(messages: Sequence[BaseMessage]) -> tuple[str | None, list[dict[str, str]], str]:
    """(system prompt or None, history, query) for the core's own template: the last human message is the
    query, leading system messages are the system prompt, the turns in between are the history."""
    turns = to_chat_dicts(messages)
    asks = [i for i, (m, t) in enumerate(zip(messages, turns)) if t["role"] == "user" and m.type not in _NOT_ASKED]
    last_user = asks[-1] if asks else None
    if last_user is None:
        raise InvalidInputError("with documents, the messages must contain a human message (the question)")
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
            return m.text
    return ""
