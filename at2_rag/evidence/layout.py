"""Which prompt spans an ablation removes: documents, their sentences, or documents plus the context parts
(earlier turns, system prompt, question). Shared by collection (training labels) and evaluation."""

from __future__ import annotations

from typing import Any, Literal

SourceKind = Literal["documents", "sentences", "context", "tokens"]
SOURCE_KINDS: tuple[str, ...] = ("documents", "sentences", "context", "tokens")
#: what a collected target is: each answer sentence (what citations score), or the whole answer
TargetKind = Literal["sentences", "answer"]
TARGET_KINDS: tuple[str, ...] = ("sentences", "answer")


def source_layout(run: Any, sources: str) -> tuple[list[tuple[int, int]], list[int], list[str]]:
    """Token spans, feature columns and ids of the sources to ablate in a captured run: documents, sentences, or
    ("context") documents plus the context parts, as conversations need."""
    if sources not in SOURCE_KINDS:
        raise ValueError(f"sources must be one of {', '.join(SOURCE_KINDS)}, got {sources!r}")
    if sources == "tokens":
        raise ValueError("token sources are not columns of a run's features: see `document_token_sources`")
    prompt = run.prompt
    n_docs, n_sents = len(prompt.doc_sources), len(prompt.sentence_sources)
    doc_ids = [d.id for d in prompt.documents]
    if sources == "documents":
        return prompt.doc_token_spans, list(range(n_docs)), doc_ids
    if sources == "context":
        first = n_docs + n_sents
        columns = list(range(n_docs)) + list(range(first, first + len(prompt.context_parts)))
        spans = prompt.doc_token_spans + prompt.context_token_spans
        return spans, columns, doc_ids + [p.key for p in prompt.context_parts]
    ids = [f"{prompt.documents[s.doc_index].id}#{s.span.start}-{s.span.end}" for s in prompt.sentence_sources]
    return prompt.sentence_token_spans, list(range(n_docs, n_docs + n_sents)), ids


def refinement_units(prompt: Any) -> tuple[list[tuple[int, int]], list[int]]:
    """Token spans and feature columns of what `ablations=k` ablates: the documents, then the earlier turns.

    The system prompt and the question stay in every pass: each answer depends on its instructions and its
    question, so their effect is the surrogate's intercept (they keep their AT2 scores) and a pass spent on
    them would say nothing about citations. With no earlier turns this is exactly the documents, the layout
    `at2-rag evaluate` measures."""
    first = len(prompt.doc_sources) + len(prompt.sentence_sources)
    turns = history_columns(prompt)
    spans = list(prompt.doc_token_spans) + [prompt.context_token_spans[c - first] for c in turns]
    return spans, list(range(len(prompt.doc_sources))) + turns


def history_columns(prompt: Any) -> list[int]:
    """Feature columns of the earlier turns (after the documents and their sentences, among the context parts)."""
    first = len(prompt.doc_sources) + len(prompt.sentence_sources)
    return [first + i for i, part in enumerate(prompt.context_parts) if part.kind == "history"]


def document_token_sources(prompt: Any) -> tuple[list[tuple[int, int]], list[str]]:
    """Every document token its own source (token-level collection, as the reference AT2 trains): one-token
    spans and ids `doc_id@t` (t counts the document's tokens from 0)."""
    spans: list[tuple[int, int]] = []
    ids: list[str] = []
    for doc, (a, b) in zip(prompt.documents, prompt.doc_token_spans):
        spans += [(t, t + 1) for t in range(a, b)]
        ids += [f"{doc.id}@{t - a}" for t in range(a, b)]
    return spans, ids
