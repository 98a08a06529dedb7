"""An answer as tokens with each token's characters, and its sentences as attribution targets: the same
for an answer generated here (decoded) and one produced elsewhere (encoded as untrusted text)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .sources import CharSpan, split_sentences
from .untrusted import encode_text


@dataclass
class AnswerTokens:
    """The answer's token ids and each token's char span in the decoded answer text."""

    token_ids: list[int]
    text: str
    char_spans: list[tuple[int, int]]


def decode_with_offsets(tokenizer: Any, token_ids: Sequence[int]) -> AnswerTokens:
    """Decode generated tokens, recording where each token's characters land in the answer text.

    Prefix decoding handles byte-level tokens that only form a character together: such a token gets an
    empty span and its character goes to the token that completes it.
    """
    spans: list[tuple[int, int]] = []
    prev = 0
    for i in range(len(token_ids)):
        text = tokenizer.decode(token_ids[: i + 1], skip_special_tokens=True)
        if text.endswith("\ufffd"):  # incomplete multi-byte character
            spans.append((prev, prev))
            continue
        end = max(prev, len(text))
        spans.append((prev, end))
        prev = end
    text = tokenizer.decode(list(token_ids), skip_special_tokens=True)
    return AnswerTokens(token_ids=list(token_ids), text=text, char_spans=spans)


def encode_with_offsets(tokenizer: Any, answer: str) -> AnswerTokens:
    """Tokenize an answer produced elsewhere, keeping each token's char span."""
    token_ids, offsets = encode_text(tokenizer, answer)  # untrusted text: control-token strings stay text
    return AnswerTokens(token_ids=token_ids, text=answer, char_spans=offsets)


def rows_for_span(answer: AnswerTokens, span: CharSpan) -> list[int]:
    """Answer-token indices whose characters overlap `span`."""
    return [i for i, (a, b) in enumerate(answer.char_spans) if b > a and b > span.start and a < span.end]


def answer_targets(answer: AnswerTokens) -> list[tuple[CharSpan, list[int]]]:
    """Answer sentences that own at least one token, with their token rows."""
    targets = []
    for span in split_sentences(answer.text):
        rows = rows_for_span(answer, span)
        if rows:
            targets.append((span, rows))
    return targets
