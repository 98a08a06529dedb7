"""Render the chat prompt and locate every source's exact token span from the tokenizer's offset mapping."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ..errors import InvalidInputError, PromptRenderError
from .sources import Document, Source, UnlocatedDocument, build_sources, context_key
from .untrusted import control_token_strings, encode_prompt

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question using only the documents provided. "
    "Be concise."
)

PLAIN_TEMPLATE_NOTE = (
    "The tokenizer has no chat template; at2-rag renders a plain 'System:/User:/Assistant:' transcript instead."
)

_PLACEHOLDER = re.compile(r"\{(documents|query|index|title|text|id)\}")


class PromptTemplate(BaseModel):
    """How documents and the question become the user turn.

    `user_template` must contain `{documents}` and `{query}` exactly once; `document_template` must contain
    `{text}` exactly once and may use `{index}` (1-based), `{id}` and `{title}` (rendered as " (title)" or "").
    Any other braces are kept literally.
    """

    model_config = ConfigDict(frozen=True)

    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    user_template: str = "Documents:\n\n{documents}\n\nQuestion: {query}"
    document_template: str = "[{index}]{title}\n{text}"
    document_separator: str = "\n\n"

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:  # pydantic wraps the validator's InvalidInputError: surface ours
            raise InvalidInputError(f"invalid PromptTemplate: {exc}") from exc

    @model_validator(mode="after")
    def _check_placeholders(self) -> PromptTemplate:
        for name in ("documents", "query"):
            if self.user_template.count("{" + name + "}") != 1:
                raise InvalidInputError(f"user_template must contain {{{name}}} exactly once: {self.user_template!r}")
        if self.document_template.count("{text}") != 1:
            raise InvalidInputError(f"document_template must contain {{text}} exactly once: {self.document_template!r}")
        return self


def _fill(template: str, values: Mapping[str, str]) -> tuple[str, dict[str, int]]:
    """Substitute known `{name}` placeholders; return the text and where each placeholder's value starts."""
    out: list[str] = []
    starts: dict[str, int] = {}
    length = 0
    last = 0
    for m in _PLACEHOLDER.finditer(template):
        name = m.group(1)
        if name not in values:
            continue
        literal = template[last : m.start()]
        out.append(literal)
        length += len(literal)
        starts[name] = length
        out.append(values[name])
        length += len(values[name])
        last = m.end()
    out.append(template[last:])
    return "".join(out), starts


@dataclass(frozen=True)
class ContextPart:
    """A part of the prompt other than the documents that an answer can stand on: an earlier turn
    (`kind="history"`, `index` = its position in the history), the system prompt, or the question.
    `prompt_text[start:end] == text`."""

    kind: str  # "history" | "system" | "query"
    index: int | None
    role: str
    text: str
    start: int
    end: int

    @property
    def key(self) -> str:
        return context_key(self.kind, self.index)


@dataclass
class RenderedPrompt:
    """The exact prompt the model sees, its tokens, and the token span of every source.

    Built by `render_prompt` (at2-rag's own template) or by `at2_rag.prompting.locate.locate_prompt` (documents found
    inside a prompt rendered elsewhere; `unlocated_documents` lists the given documents it does not contain).
    """

    text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    documents: list[Document]
    user_content: str
    doc_sources: list[Source]
    sentence_sources: list[Source]
    doc_char_starts: list[int]  # where each document's text begins in `text`
    doc_token_spans: list[tuple[int, int]] = field(default_factory=list)
    sentence_token_spans: list[tuple[int, int]] = field(default_factory=list)
    used_chat_template: bool = True
    unlocated_documents: list[UnlocatedDocument] = field(default_factory=list)
    # char ranges of untrusted text (message contents, located documents): tokenized as text, never as control
    text_ranges: list[tuple[int, int]] = field(default_factory=list)
    # earlier turns, the system prompt and the question: scored like documents (`Attribution.context_sources`)
    context_parts: list[ContextPart] = field(default_factory=list)
    context_token_spans: list[tuple[int, int]] = field(default_factory=list)

    def assign_token_spans(self) -> None:
        """Token spans of documents, their sentences and the context parts, from the offsets.

        Documents and context parts never share a token (they are mapped together); sentences lie inside
        their documents (mapped on their own)."""
        doc_ranges = [self.source_char_range(s) for s in self.doc_sources]
        spans = token_spans_for_any_ranges(self.offsets, doc_ranges + [(p.start, p.end) for p in self.context_parts])
        self.doc_token_spans = spans[: len(doc_ranges)]
        self.context_token_spans = spans[len(doc_ranges) :]
        self.sentence_token_spans = token_spans_for_ranges(
            self.offsets, [self.source_char_range(s) for s in self.sentence_sources]
        )

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    def source_char_range(self, source: Source) -> tuple[int, int]:
        base = self.doc_char_starts[source.doc_index]
        return base + source.span.start, base + source.span.end


def normalize_history(history: Sequence[Any] | None, what: str = "history turn") -> list[dict[str, str]]:
    """Earlier turns as chat messages. Accepts dicts with role/content, (role, content) pairs, or objects
    with `type`/`role` and `content` attributes (LangChain and LlamaIndex messages)."""
    messages: list[dict[str, str]] = []
    for i, turn in enumerate(history or []):
        if isinstance(turn, Mapping):
            role, content = turn.get("role"), turn.get("content")
        elif isinstance(turn, (tuple, list)) and len(turn) == 2:
            role, content = turn
        else:
            role = getattr(turn, "role", None) or getattr(turn, "type", None)
            role = getattr(role, "value", role)
            content = getattr(turn, "content", None)
        role = {"human": "user", "ai": "assistant", "chatbot": "assistant"}.get(str(role), role)
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise InvalidInputError(
                f"{what} {i} must have role system/user/assistant and string content, got {turn!r}"
            )
        messages.append({"role": role, "content": content})
    return messages


def _plain_render(messages: list[dict[str, str]]) -> str:
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "".join(f"{names[m['role']]}: {m['content']}\n\n" for m in messages) + "Assistant:"


def _apply_template(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, bool]:
    if getattr(tokenizer, "chat_template", None) is None:
        return _plain_render(messages), False
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
    except Exception as exc:  # some templates (Gemma) refuse a system turn: fold it into the first user turn
        if messages and messages[0]["role"] == "system":
            system, rest = messages[0]["content"], messages[1:]
            if rest and rest[0]["role"] == "user":
                rest = [{"role": "user", "content": system + "\n\n" + rest[0]["content"]}] + rest[1:]
                logger.info("chat template refused a system turn (%s); folded it into the user turn", exc)
                try:
                    return tokenizer.apply_chat_template(rest, tokenize=False, add_generation_prompt=True), True
                except Exception as again:
                    exc = again
        raise PromptRenderError(f"the tokenizer's chat template failed to render the prompt: {exc}") from exc


@dataclass
class RenderedMessages:
    """A chat rendered with the template, and where each message's content lies in the text.

    `content_ranges[i]` is the char range of message i's content, or None where the template changed that
    content (trimmed, escaped), so it has no exact place. Content is untrusted text; the rest is the template's.
    """

    text: str
    used_chat_template: bool
    messages: list[dict[str, str]]
    content_ranges: list[tuple[int, int] | None]

    @property
    def text_ranges(self) -> list[tuple[int, int]]:
        return [r for r in self.content_ranges if r is not None]


def _sentinel(i: int) -> str:
    return f"\ue000{i}\ue001"  # private-use code points: no template or tokenizer gives them meaning


def render_messages_with_ranges(tokenizer: Any, messages: Sequence[Any]) -> RenderedMessages:
    """`render_messages`, also locating every message's content in the rendered text.

    The template is rendered once over placeholders to learn where each content goes, and once over the real
    contents; where the two agree the ranges are exact. Where they do not (a template that trims or escapes
    content), each content is searched verbatim in order and left None when it is not there.
    """
    normalized = normalize_history(messages, what="message")
    text, used = _apply_template(tokenizer, normalized)
    if not used:
        logger.info(PLAIN_TEMPLATE_NOTE)
    skeleton, _ = _apply_template(tokenizer, [{**m, "content": _sentinel(i)} for i, m in enumerate(normalized)])
    ranges: list[tuple[int, int] | None] = []
    pieces: list[str] = []
    pos = 0  # in the skeleton
    length = 0  # of the substituted text so far
    for i, message in enumerate(normalized):
        at = skeleton.find(_sentinel(i), pos)
        if at < 0:
            break
        pieces.append(skeleton[pos:at])
        length += at - pos
        ranges.append((length, length + len(message["content"])))
        pieces.append(message["content"])
        length += len(message["content"])
        pos = at + len(_sentinel(i))
    pieces.append(skeleton[pos:])
    if len(ranges) == len(normalized) and "".join(pieces) == text:
        return RenderedMessages(text, used, normalized, ranges)

    ranges, pos = [], 0
    for message in normalized:
        content = message["content"]
        at = text.find(content, pos) if content else -1
        if at < 0:
            ranges.append(None)
            continue
        ranges.append((at, at + len(content)))
        pos = at + len(content)
    return RenderedMessages(text, used, normalized, ranges)


def render_messages(tokenizer: Any, messages: Sequence[Any]) -> tuple[str, bool]:
    """The tokenizer's chat template over `messages`, with the generation prompt: `(text, used_chat_template)`.

    Messages are anything `normalize_history` accepts (role/content dicts, (role, content) pairs, LangChain or
    LlamaIndex messages). Without a chat template a plain 'System:/User:/Assistant:' transcript is rendered
    (`used_chat_template` False); a template that refuses a system turn gets it folded into the first user turn.
    """
    messages = normalize_history(messages, what="message")
    text, used = _apply_template(tokenizer, messages)
    if not used:
        logger.info(PLAIN_TEMPLATE_NOTE)
    return text, used


def check_untrusted_text_placed(tokenizer: Any, rendered: RenderedMessages) -> None:
    """Refuse a chat whose content could not be placed exactly and holds control-token text: without a place,
    that text cannot be kept from becoming control tokens."""
    control = control_token_strings(tokenizer)
    for i, (message, where) in enumerate(zip(rendered.messages, rendered.content_ranges)):
        if where is None and any(c in message["content"] for c in control):
            raise PromptRenderError(
                f"message {i} ({message['role']}) contains control-token text and the chat template changed its "
                "content, so it cannot be tokenized as plain text safely"
            )


def token_spans_for_ranges(
    offsets: Sequence[tuple[int, int]], ranges: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Token span `[first, last)` of every char range: the tokens whose characters overlap it.

    Ranges must be sorted and non-overlapping. A token overlapping several ranges (even three or more, when
    short ranges share one token) goes to the one it overlaps most, the earlier on a tie, so spans never share
    a token and stay in order. A range left without tokens (an empty range, or one whose only tokens went to
    a neighbour) gets an empty span at its position.
    """
    import bisect

    ends = [b for _, b in offsets]
    raw: list[tuple[int, int]] = []
    for start, end in ranges:
        first = bisect.bisect_right(ends, start)  # first token ending after `start`
        last = first
        while last < len(offsets) and offsets[last][0] < end:
            last += 1
        # skip zero-width tokens at the edges
        while first < last and offsets[first][1] <= start:
            first += 1
        if end <= start:
            last = first
        raw.append((first, max(first, last)))

    owner: dict[int, tuple[int, int]] = {}  # token -> (overlap, range index)
    for i, ((start, end), (a, b)) in enumerate(zip(ranges, raw)):
        for tok in range(a, b):
            ts, te = offsets[tok]
            overlap = min(te, end) - max(ts, start)
            if tok not in owner or overlap > owner[tok][0]:
                owner[tok] = (overlap, i)

    spans: list[tuple[int, int]] = []
    prev_end = 0
    for i, (a, b) in enumerate(raw):
        mine = [tok for tok in range(a, b) if owner[tok][1] == i]
        if mine:
            span = (mine[0], mine[-1] + 1)
        else:
            later = [tok for tok in range(a, b) if owner[tok][1] > i]
            pos = max(later[0] if later else b, prev_end)
            span = (pos, pos)
        spans.append(span)
        prev_end = max(prev_end, span[1])
    return spans


def token_spans_for_any_ranges(
    offsets: Sequence[tuple[int, int]], ranges: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """`token_spans_for_ranges` for non-overlapping ranges in any order (documents and context parts
    interleave: the question may come before or after the documents)."""
    order = sorted(range(len(ranges)), key=lambda i: (ranges[i][0], ranges[i][1]))
    spans = token_spans_for_ranges(offsets, [ranges[i] for i in order])
    out: list[tuple[int, int]] = [(0, 0)] * len(ranges)
    for i, span in zip(order, spans):
        out[i] = span
    return out


def chat_context_parts(
    messages: Sequence[Mapping[str, str]],
    ranges: Sequence[tuple[int, int] | None],
    *,
    system_first: bool,
    skip: Sequence[bool] = (),
) -> list[ContextPart]:
    """Context parts of a chat: the leading system message (when `system_first`) is "system", the others are
    "history" turns numbered from 0 (numbers count skipped messages too). Messages marked in `skip` (they hold
    documents) and contents the template changed (no range, with a log line) are left out."""
    parts: list[ContextPart] = []
    turn = 0
    for i, (message, where) in enumerate(zip(messages, ranges)):
        is_system = system_first and i == 0 and message["role"] == "system"
        index = None if is_system else turn
        if not is_system:
            turn += 1
        if i < len(skip) and skip[i]:
            continue
        if where is None:
            logger.info("message %d: the chat template changed its content; it is not scored as a source", i)
            continue
        kind = "system" if is_system else "history"
        parts.append(ContextPart(kind, index, message["role"], message["content"], where[0], where[1]))
    return parts


def render_prompt(
    tokenizer: Any,
    query: str,
    documents: Sequence[Document],
    template: PromptTemplate | None = None,
    history: Sequence[Any] | None = None,
) -> RenderedPrompt:
    """Build the chat prompt and every source's token span. Spans come from offsets, never from guesses."""
    if not isinstance(query, str) or not query.strip():
        raise InvalidInputError("query must be a non-empty string")
    template = template or PromptTemplate()
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidInputError(
            "at2-rag needs a fast (Rust) tokenizer for exact offset mapping; load it with use_fast=True"
        )

    doc_blocks: list[str] = []
    text_offsets: list[int] = []
    for i, doc in enumerate(documents):
        title = f" ({doc.title})" if doc.title else ""
        block, starts = _fill(
            template.document_template, {"index": str(i + 1), "title": title, "id": doc.id or "", "text": doc.text}
        )
        doc_blocks.append(block)
        text_offsets.append(starts["text"])
    joined_docs_parts: list[str] = []
    doc_offsets_in_joined: list[int] = []
    pos = 0
    for i, block in enumerate(doc_blocks):
        if i:
            joined_docs_parts.append(template.document_separator)
            pos += len(template.document_separator)
        doc_offsets_in_joined.append(pos + text_offsets[i])
        joined_docs_parts.append(block)
        pos += len(block)
    joined = "".join(joined_docs_parts)
    user_content, starts = _fill(template.user_template, {"documents": joined, "query": query})
    doc_offsets_in_user = [starts["documents"] + o for o in doc_offsets_in_joined]

    messages: list[dict[str, str]] = []
    if template.system_prompt:
        messages.append({"role": "system", "content": template.system_prompt})
    messages.extend(normalize_history(history))
    messages.append({"role": "user", "content": user_content})
    chat = render_messages_with_ranges(tokenizer, messages)
    text, used_chat_template = chat.text, chat.used_chat_template

    user_range = chat.content_ranges[-1]
    if user_range is None or text[user_range[0] : user_range[1]] != user_content:
        raise PromptRenderError(
            "the chat template altered the user turn (for example by trimming or escaping it), so document "
            "spans cannot be located exactly; use a PromptTemplate whose text the template keeps verbatim"
        )
    check_untrusted_text_placed(tokenizer, chat)
    base = user_range[0]
    doc_char_starts = [base + o for o in doc_offsets_in_user]

    input_ids, offsets = encode_prompt(tokenizer, text, chat.text_ranges)

    doc_sources, sentence_sources = build_sources(documents)
    system_first = bool(template.system_prompt)
    context_parts = chat_context_parts(messages[:-1], chat.content_ranges[:-1], system_first=system_first)
    query_start = base + starts["query"]
    context_parts.append(ContextPart("query", None, "user", query, query_start, query_start + len(query)))
    rendered = RenderedPrompt(
        text=text,
        input_ids=input_ids,
        offsets=offsets,
        documents=list(documents),
        user_content=user_content,
        doc_sources=doc_sources,
        sentence_sources=sentence_sources,
        doc_char_starts=doc_char_starts,
        used_chat_template=used_chat_template,
        text_ranges=chat.text_ranges,
        context_parts=context_parts,
    )
    rendered.assign_token_spans()
    return rendered
