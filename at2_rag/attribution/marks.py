"""One claim per answer sentence: which source a reader is shown for it.

A sentence can be shown as drawn from the retrieved documents (their numbers, `Citation.cited`), as coming from
an earlier answer of the conversation (`"earlier_answer"`), or as not from the documents
(`"not_from_documents"`). These are alternatives, never combined: a sentence never carries document numbers and
"from the earlier answer" at once, nor "not from the documents" and a document number. `sentence_source` decides,
from the values the core measured (or estimated):

1. **Earlier answer.** With measured groundedness in a conversation (`Citation.context_grounded` is set),
   removing every earlier turn lowers the sentence's log-odds by at least `grounded_threshold` nats, and the best
   earlier turn the sentence draws on (`Citation.context`, best first) is an assistant turn. Otherwise (estimated
   or off) the sentence's best context source is an assistant turn that reaches `support_threshold` and scores
   above every retrieved document. In both cases the sentence must also be *in* that answer: at least half of its
   words occur in the turn's text (`repeats`), so a sentence that only depends on the earlier question, or on the
   conversation's topic, is never said to come from the earlier answer.
2. **Documents or earlier answer, the stronger.** A sentence that depends on both (measured: `grounded` and
   `context_grounded` both reach the threshold) is shown with the source whose removal lowers it more: the earlier
   answer when `context_grounded > grounded` (then no document number: the earlier answer's own marks say what
   supports it), else the documents. With estimated scores the earlier answer already had to score above every
   document.
3. **Not from the documents** when the sentence is not `supported` and not from an earlier answer: no document
   number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from .result import Citation, ContextSource

SentenceMark = Literal["earlier_answer", "not_from_documents"]
REPEAT_WORD_SHARE = 0.5  # the share of a sentence's words an earlier answer must hold for the sentence to be "in" it
_WORD = re.compile(r"\w+")


def repeats(sentence: str, earlier: str, share: float = REPEAT_WORD_SHARE) -> bool:
    """Whether `sentence` is in the earlier turn's text `earlier`: at least `share` of its distinct words (case
    folded) occur there. A sentence without words is in no turn."""
    words = set(_WORD.findall(sentence.casefold()))
    if not words:
        return False
    return len(words & set(_WORD.findall(earlier.casefold()))) >= share * len(words)


@dataclass(frozen=True)
class SentenceSource:
    """What a reader is shown for one answer sentence (see the module docstring): `mark`, the earlier assistant
    turn when `mark` is "earlier_answer", and `cited`, the ids of the documents whose numbers it carries (empty
    whenever `mark` is set)."""

    mark: SentenceMark | None
    earlier: ContextSource | None = None
    cited: list[str] = field(default_factory=list)


def earlier_turn(citation: Citation, support_threshold: float, grounded_threshold: float = 1.0) -> ContextSource | None:
    """The earlier assistant turn the sentence comes from by rule 1 of the module docstring, or None. A context
    source without its text (a client that dropped it) is not checked for the words."""
    if citation.context_grounded is not None:
        if citation.context_grounded < grounded_threshold:
            return None
        best = next((c for c in citation.context if c.kind == "history"), None)  # sorted best first
    else:
        best = citation.context[0] if citation.context else None
        best_document = max((d.score for d in citation.documents), default=None)
        if best is None or best.score < support_threshold or (
            best_document is not None and best.score <= best_document
        ):
            return None
    if best is None or best.kind != "history" or best.role != "assistant" or best.index is None:
        return None
    if best.text and not repeats(citation.text, best.text):
        return None
    return best


def sentence_source(citation: Citation, support_threshold: float, grounded_threshold: float = 1.0) -> SentenceSource:
    """The one source a reader is shown for this sentence (rules 1-3 of the module docstring)."""
    earlier = earlier_turn(citation, support_threshold, grounded_threshold)
    if earlier is not None:
        measured_both = (
            citation.context_grounded is not None
            and citation.supported
            and citation.grounded is not None
            and citation.grounded >= citation.context_grounded
        )
        if not measured_both:
            return SentenceSource("earlier_answer", earlier)
    if not citation.supported:
        return SentenceSource("not_from_documents")
    return SentenceSource(None, cited=list(citation.cited))
