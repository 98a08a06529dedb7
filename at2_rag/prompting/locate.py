"""Locate documents inside a prompt somebody else rendered, and map them to exact token spans.

`render_prompt` builds its own prompt, so it knows where every document is. Frameworks (LangChain chains, a
LlamaIndex synthesizer, a hand-written f-string) format the documents into *their* prompt; here each document
is found in the finished prompt instead: its exact (stripped) text first, then the same words with any
whitespace between them. Documents that cannot be found are reported (`UnlocatedDocument`, with the reason),
never silently dropped. The result is an ordinary `RenderedPrompt` whose sources are the located documents (in
prompt order) and their sentences, so every run and the scoring work on it unchanged
(`Attributor.locate`, `Attributor.attribute_rendered`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInputError
from .render import (
    ContextPart,
    RenderedMessages,
    RenderedPrompt,
    chat_context_parts,
    check_untrusted_text_placed,
    token_spans_for_ranges,
)
from .sources import Document, DocumentLike, UnlocatedDocument, build_sources, normalize_documents
from .untrusted import control_token_strings, encode_prompt

__all__ = [
    "LocatedDocument",
    "LocatedPrompt",
    "UnlocatedDocument",
    "control_regions",
    "locate_documents",
    "locate_prompt",
]


@dataclass(frozen=True)
class LocatedDocument:
    """A document found in the prompt: `prompt[start:end]` is its text (`document.text`)."""

    position: int  # index in the caller's list of documents
    document: Document  # text = exactly the prompt's characters (differs from the input only in whitespace)
    start: int
    end: int
    match: str  # "exact" | "whitespace"


@dataclass
class LocatedPrompt:
    """A rendered prompt whose sources are the located documents (in prompt order) and their sentences.

    `unlocated` is the same list as `prompt.unlocated_documents` (so a run over `prompt` reports them).
    """

    prompt: RenderedPrompt
    located: list[LocatedDocument] = field(default_factory=list)
    unlocated: list[UnlocatedDocument] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.prompt.text


def _whitespace_pattern(text: str) -> re.Pattern[str] | None:
    words = text.split()
    if not words:
        return None
    return re.compile(r"\s+".join(re.escape(w) for w in words))


def _occurrences(prompt: str, needle: str) -> Iterator[tuple[int, int, str]]:
    start = prompt.find(needle)
    while start >= 0:
        yield start, start + len(needle), "exact"
        start = prompt.find(needle, start + 1)
    pattern = _whitespace_pattern(needle)
    if pattern is not None:
        for m in pattern.finditer(prompt):
            if m.group(0) != needle:
                yield m.start(), m.end(), "whitespace"


def _spaceless_script(char: str) -> bool:
    """Scripts written without spaces between words (CJK, kana, Thai): any character boundary is a word boundary."""
    code = ord(char)
    return (
        0x0E00 <= code <= 0x0E7F
        or 0x3040 <= code <= 0x30FF
        or 0x3400 <= code <= 0x9FFF
        or 0xF900 <= code <= 0xFAFF
        or code >= 0x20000
    )


def _wordlike(char: str) -> bool:
    return (char.isalnum() or char == "_") and not _spaceless_script(char)


def _on_word_boundaries(prompt: str, start: int, end: int) -> bool:
    """The match neither begins nor ends inside a word (`art` is not found in `start`, `cat` not in `cats`)."""
    if start > 0 and _wordlike(prompt[start]) and _wordlike(prompt[start - 1]):
        return False
    if end < len(prompt):
        after = prompt[end]
        if unicodedata.category(after).startswith("M"):  # a combining mark continues the last character
            return False
        if _wordlike(prompt[end - 1]) and _wordlike(after):
            return False
    return True


def control_regions(tokenizer: Any, prompt: str) -> list[tuple[int, int]]:
    """Char ranges of template control text in a prompt rendered elsewhere: every control-token string, with the
    role name that directly follows it (`<|im_start|>user`). A document never straddles one of them."""
    strings = control_token_strings(tokenizer)
    if not strings:
        return []
    pattern = re.compile("(?:" + "|".join(re.escape(t) for t in strings) + ")" + _ROLE_AFTER_CONTROL)
    return [m.span() for m in pattern.finditer(prompt)]


_ROLE_AFTER_CONTROL = r"(?:(?:system|user|assistant|model|tool|developer|ipython)\b)?"


def _straddles(span: tuple[int, int], regions: Sequence[tuple[int, int]]) -> bool:
    a, b = span
    return any(a < rb and ra < b and not (a <= ra and rb <= b) for ra, rb in regions)


def _inside_one(span: tuple[int, int], regions: Sequence[tuple[int, int]]) -> bool:
    a, b = span
    return any(ra <= a and b <= rb for ra, rb in regions)


def locate_documents(
    prompt: str,
    documents: Sequence[Document],
    *,
    within: Sequence[tuple[int, int]] | None = None,
    control: Sequence[tuple[int, int]] = (),
) -> tuple[list[LocatedDocument], list[UnlocatedDocument]]:
    """Find every document's (stripped) text in `prompt`; each prompt character belongs to at most one document.

    The result does not depend on the order of `documents`: longer texts claim their place first (so a short
    document contained in a long one cannot take the long one's place), equal texts in list order, each the
    first free occurrence, exact text before the same words with other whitespace. A match lies on word
    boundaries, inside one of the `within` ranges when given (the content of a chat's messages), and never
    straddles a `control` range (template control text). Returns the located documents sorted by position in
    the prompt, and the rest (in list order) with a reason.
    """
    taken: list[tuple[int, int]] = []
    located: list[LocatedDocument] = []
    unlocated: list[UnlocatedDocument] = []
    order = sorted(range(len(documents)), key=lambda i: (-len(documents[i].text.strip()), documents[i].text.strip(), i))
    for position in order:
        doc = documents[position]
        doc_id = doc.id or f"doc{position}"
        needle = doc.text.strip()
        if not needle:
            unlocated.append(UnlocatedDocument(position=position, id=doc_id, title=doc.title, reason="empty text"))
            continue
        found = None
        clashed = False
        for a, b, kind in _occurrences(prompt, needle):
            if not _on_word_boundaries(prompt, a, b) or _straddles((a, b), control):
                continue
            if within is not None and not _inside_one((a, b), within):
                continue
            if any(a < tb and ta < b for ta, tb in taken):
                clashed = True
                continue
            found = (a, b, kind)
            break
        if found is None:
            reason = (
                "its text only occurs inside another document's span (duplicate or contained text)"
                if clashed
                else "its text does not occur in the prompt (was it truncated, reformatted or left out?)"
            )
            unlocated.append(UnlocatedDocument(position=position, id=doc_id, title=doc.title, reason=reason))
            continue
        a, b, kind = found
        taken.append((a, b))
        text = prompt[a:b]
        located_doc = doc if text == doc.text else doc.model_copy(update={"text": text})
        located.append(LocatedDocument(position, located_doc, a, b, kind))
    located.sort(key=lambda d: d.start)
    unlocated.sort(key=lambda u: u.position)
    return located, unlocated


def _find_query(
    prompt: str, query: str, lo: int, hi: int, taken: Sequence[tuple[int, int]], control: Sequence[tuple[int, int]]
) -> tuple[int, int] | None:
    """The last occurrence of `query` in `prompt[lo:hi]` outside every document and control text."""
    needle = query.strip()
    if not needle:
        return None
    at = prompt.rfind(needle, lo, hi)
    while at >= 0:
        span = (at, at + len(needle))
        clear = not any(span[0] < b and a < span[1] for a, b in taken) and not _straddles(span, control)
        if clear and _on_word_boundaries(prompt, *span):
            return span
        at = prompt.rfind(needle, lo, at + len(needle) - 1) if at > lo else -1
    return None


def _context_parts(
    text: str,
    chat: RenderedMessages | None,
    located: Sequence[LocatedDocument],
    query: str,
    control: Sequence[tuple[int, int]],
) -> list[ContextPart]:
    """Earlier turns, a leading system message and the question of a prompt rendered elsewhere.

    In a chat, every message before the last that holds no document is a source ("system" for a leading system
    message, else "history", numbered from 0); the last message is the question when it holds no document,
    else the question is `query` found inside it. In a string only `query` can be found."""
    taken = [(d.start, d.end) for d in located]
    if chat is None:
        span = _find_query(text, query, 0, len(text), taken, control)
        return [ContextPart("query", None, "user", text[span[0] : span[1]], *span)] if span else []
    messages, ranges = chat.messages, chat.content_ranges
    holds_doc = [r is not None and any(r[0] <= a and b <= r[1] for a, b in taken) for r in ranges]
    parts = chat_context_parts(messages[:-1], ranges[:-1], system_first=True, skip=holds_doc[:-1])
    last, where = messages[-1], ranges[-1]
    if where is not None and last["role"] == "user":
        if not holds_doc[-1]:
            parts.append(ContextPart("query", None, "user", last["content"], where[0], where[1]))
        else:
            span = _find_query(text, query, where[0], where[1], taken, control)
            if span:
                parts.append(ContextPart("query", None, "user", text[span[0] : span[1]], *span))
    return parts


def _drop_tokenless(
    offsets: Sequence[tuple[int, int]], located: list[LocatedDocument], unlocated: list[UnlocatedDocument]
) -> tuple[list[LocatedDocument], list[UnlocatedDocument]]:
    """A document glued to other text (no separator) whose every token it shares with that text has no tokens
    of its own to score: report it, with the reason, instead of scoring an empty span."""
    spans = token_spans_for_ranges(offsets, [(d.start, d.end) for d in located])
    tokenless = [d for d, (a, b) in zip(located, spans) if a == b]
    if not tokenless:
        return located, unlocated
    reason = "its text only occurs inside tokens it shares with the text around it, so it has no tokens of its own"
    extra = [
        UnlocatedDocument(
            position=d.position, id=d.document.id or f"doc{d.position}", title=d.document.title, reason=reason
        )
        for d in tokenless
    ]
    kept = [d for d in located if d not in tokenless]
    return kept, sorted(unlocated + extra, key=lambda u: u.position)


def locate_prompt(
    tokenizer: Any,
    text: str | RenderedMessages,
    documents: Sequence[DocumentLike] = (),
    *,
    used_chat_template: bool = True,
    query: str = "",
) -> LocatedPrompt:
    """Tokenize the prompt (no special tokens added, as `render_prompt` does) and map located documents to
    token spans. With no documents it is a plain prompt without sources (for generation without capture).

    `text` is the exact prompt string, or a chat rendered by `render_messages_with_ranges`: then documents are
    only looked for inside the messages' content, all of that content is tokenized as text, and the earlier
    turns and the question become context sources (`_context_parts`). In a string, documents are tokenized as
    text (control-token strings inside them never become control tokens) and `query`, when found outside
    them, is the only context source.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidInputError("at2-rag needs a fast (Rust) tokenizer for exact offset mapping")
    docs = normalize_documents(documents) if len(documents) else []
    chat: RenderedMessages | None = None
    if isinstance(text, RenderedMessages):
        chat = text
        check_untrusted_text_placed(tokenizer, chat)
        text, used_chat_template = chat.text, chat.used_chat_template
        control: list[tuple[int, int]] = []
        located, unlocated = locate_documents(text, docs, within=chat.text_ranges)
        untrusted = chat.text_ranges
    else:
        control = control_regions(tokenizer, text)
        located, unlocated = locate_documents(text, docs, control=control)
        untrusted = [(d.start, d.end) for d in located]
    input_ids, offsets = encode_prompt(tokenizer, text, untrusted)
    located, unlocated = _drop_tokenless(offsets, located, unlocated)
    ordered = [d.document for d in located]
    doc_sources, sentence_sources = build_sources(ordered)
    prompt = RenderedPrompt(
        text=text,
        input_ids=input_ids,
        offsets=offsets,
        documents=ordered,
        user_content="",
        doc_sources=doc_sources,
        sentence_sources=sentence_sources,
        doc_char_starts=[d.start for d in located],
        used_chat_template=used_chat_template,
        unlocated_documents=unlocated,
        text_ranges=list(untrusted),
        context_parts=_context_parts(text, chat, located, query, control) if docs else [],
    )
    prompt.assign_token_spans()
    return LocatedPrompt(prompt, located, unlocated)
