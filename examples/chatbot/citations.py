"""What the page gets for an answer: the Attribution as JSON and, per answer sentence, its citation with the one
source a reader is shown for it. The rule that decides that source (document numbers, "from the earlier answer"
or "not from your documents", never two) is the core's: `at2_rag.attribution.marks.sentence_source`; this module
only turns its decision into JSON."""

from __future__ import annotations

from typing import Any

from at2_rag import Attribution, Citation
from at2_rag.attribution.marks import sentence_source
from at2_rag.attribution.result import ContextSource


def earlier_answer(
    citation: Citation, support_threshold: float, grounded_threshold: float = 1.0
) -> dict[str, Any] | None:
    """The earlier assistant turn an answer sentence is shown as coming from, as the page's JSON, or None: the turn
    the core's one rule for what a sentence is shown as picks (`at2_rag.attribution.marks.sentence_source`).

    `history_index` is the turn's position in the request's `history` list; the page maps it back to its own
    conversation (it may have sent only the newest turns)."""
    return _earlier_json(citation, sentence_source(citation, support_threshold, grounded_threshold).earlier)


def _earlier_json(citation: Citation, turn: ContextSource | None) -> dict[str, Any] | None:
    if turn is None:
        return None
    out: dict[str, Any] = {
        "history_index": turn.index,
        "score": turn.score,
        "best_document_score": max((d.score for d in citation.documents), default=None),
    }
    if citation.context_grounded is not None:
        out["context_grounded"] = citation.context_grounded
    return out


def attribution_payload(attribution: Attribution) -> dict[str, Any]:
    """The Attribution as JSON for the page (`Attribution.to_dict()` without the long prompt), plus each
    document's share of the positive attribution mass (for the bars), the answer with [n] marks, the context
    scores, and per answer sentence its `earlier_answer` (see `earlier_answer`) and `mark` (see `citation_payload`).

    Context sources (here and per sentence) carry kind, index, role and score but not their text: the page sent
    that text as `history` and has it already."""
    data = attribution.to_dict()
    data.pop("prompt", None)
    total = sum(max(0.0, d.score) for d in attribution.documents) or 1.0
    for doc in data["documents"]:
        doc["share"] = max(0.0, doc["score"]) / total
    data["context_scores"] = attribution.context_scores()
    data["context_sources"] = [_context_json(c) for c in attribution.context_sources]
    data["citations"] = [
        citation_payload(cit, attribution.support_threshold, attribution.grounded_threshold)
        for cit in attribution.citations
    ]
    # the answer with the [n] marks the page shows (a sentence from an earlier answer carries none)
    shown = [c.model_copy(update={"cited": out["cited"]}) for c, out in zip(attribution.citations, data["citations"])]
    data["cited_answer"] = attribution.model_copy(update={"citations": shown}).cited_answer()
    return data


def citation_payload(citation: Citation, support_threshold: float, grounded_threshold: float = 1.0) -> dict[str, Any]:
    """One answer sentence's citation as the page gets it, in the `citation` event while the answer streams and
    in the `attribution` event's `citations`: `Citation.model_dump()` (with `grounded`, `supported`,
    `context_grounded`), context sources without their text, plus `earlier_answer` and `mark` ("earlier_answer",
    "not_from_documents" or None).

    One claim per sentence (`at2_rag.attribution.marks.sentence_source`): a sentence marked "earlier_answer" or
    "not_from_documents" carries no document number (`cited` is empty), and document numbers come without a mark."""
    out = citation.model_dump(mode="json")
    out["context"] = [_context_json(c) for c in citation.context]
    source = sentence_source(citation, support_threshold, grounded_threshold)  # one claim per sentence
    out["earlier_answer"] = _earlier_json(citation, source.earlier)
    out["mark"] = source.mark
    out["cited"] = source.cited
    return out


def _context_json(source: ContextSource) -> dict[str, Any]:
    return {"kind": source.kind, "index": source.index, "role": source.role, "score": source.score, "key": source.key}

