"""From per-token captured attention to per-target head features, and answer sentences as targets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..prompting.sources import CharSpan, split_sentences
from ..prompting.untrusted import encode_text

FEATURE_VERSION = 1
FEATURE_DEFINITION = (
    "f[target, source, layer*H + head] = mean over the target's tokens (query rows = the positions that "
    "predict them) of the sum over the source's tokens of the fp32 softmax attention weight; heads "
    "ordered layer-major, one feature per query head (AT2 reference definition)"
)


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


def target_features(token_features: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """Mean over the target's token rows: `[rows, sources, LH]` -> `[sources, LH]`."""
    if not rows:
        return token_features.new_zeros(token_features.shape[1:])
    return token_features[list(rows)].mean(dim=0)
