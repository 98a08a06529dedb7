"""One claim per answer sentence (attribution.marks): document numbers, "from the earlier answer" or "not from the
documents", decided by the measured (or estimated) values; never two at once (issue 36 point 8)."""

from __future__ import annotations

import pytest

from at2_rag import Citation
from at2_rag.attribution.marks import SentenceSource, earlier_turn, repeats, sentence_source
from at2_rag.attribution.result import CitedDocument, ContextSource

EARLIER = "The Canopy API allows up to 10 requests per minute per workspace."


def citation(
    text: str = EARLIER,
    grounded: float | None = 2.0,
    context_grounded: float | None = None,
    context: list[tuple[str, int | None, str, float, str]] | None = None,
    docs: tuple[float, ...] = (0.02,),
    threshold: float = 1.0,
) -> Citation:
    supported = grounded is None or grounded >= threshold
    return Citation(
        text=text,
        start=0,
        end=len(text),
        documents=[CitedDocument(index=i, id=f"doc{i}", score=s) for i, s in enumerate(docs)],
        cited=["doc0"] if supported else [],
        supported=supported,
        grounded=grounded,
        context=[ContextSource(kind=k, index=i, role=r, score=s, text=t) for k, i, r, s, t in (context or [])],
        context_grounded=context_grounded,
    )


ANSWER_TURN = [("history", 1, "assistant", 0.03, EARLIER), ("history", 0, "user", 0.01, "How many requests?")]


@pytest.mark.parametrize(
    "grounded, context_grounded, mark, cited",
    [
        (2.85, 9.69, "earlier_answer", []),  # both measured: the earlier answer's drop is larger (the case)
        (9.69, 2.85, None, ["doc0"]),  # both: the documents' drop is larger
        (3.0, 3.0, None, ["doc0"]),  # a tie: the documents
        (0.2, 6.0, "earlier_answer", []),  # only the earlier answer
        (5.0, 0.4, None, ["doc0"]),  # only the documents
        (0.2, 0.4, "not_from_documents", []),  # neither
    ],
)
def test_the_larger_measured_drop_decides_the_one_source_shown(grounded, context_grounded, mark, cited):
    source = sentence_source(citation(grounded=grounded, context_grounded=context_grounded, context=ANSWER_TURN), 0.002)
    assert source.mark == mark and source.cited == cited
    assert (source.earlier is not None) == (mark == "earlier_answer")
    if source.earlier is not None:
        assert source.earlier.index == 1 and source.earlier.role == "assistant"


def test_a_sentence_not_in_the_earlier_answer_is_never_said_to_come_from_it():
    # depends on the earlier turns (measured), the assistant turn is the best of them, but says something else
    other = citation(
        text="Parental leave lasts sixteen weeks at full pay.", grounded=0.3, context_grounded=4.0, context=ANSWER_TURN
    )
    assert earlier_turn(other, 0.002) is None
    assert sentence_source(other, 0.002) == SentenceSource("not_from_documents")
    # the same with estimated scores (the earlier answer scores above every document)
    estimated = other.model_copy(update={"context_grounded": None})
    assert sentence_source(estimated, 0.002).mark == "not_from_documents"
    # the sentence it does repeat is marked, with either kind of value
    assert sentence_source(citation(grounded=0.3, context_grounded=4.0, context=ANSWER_TURN), 0.002).mark == (
        "earlier_answer"
    )
    assert sentence_source(citation(grounded=0.3, context=ANSWER_TURN, docs=(0.01,)), 0.002).mark == "earlier_answer"


def test_estimated_scores_mark_the_earlier_answer_only_above_every_document_and_then_without_numbers():
    above = sentence_source(citation(grounded=3.0, context=ANSWER_TURN, docs=(0.01,)), 0.002)
    assert above.mark == "earlier_answer" and above.cited == []
    below = sentence_source(citation(grounded=3.0, context=ANSWER_TURN, docs=(0.05,)), 0.002)
    assert below.mark is None and below.cited == ["doc0"]
    off = sentence_source(citation(grounded=None, context=[], docs=(0.05,)), 0.002)  # groundedness off
    assert off.mark is None and off.cited == ["doc0"]


def test_the_user_turn_or_system_prompt_is_not_an_earlier_answer():
    user_first = [("history", 0, "user", 0.05, EARLIER), ("history", 1, "assistant", 0.01, EARLIER)]
    assert earlier_turn(citation(grounded=0.1, context_grounded=5.0, context=user_first), 0.002) is None
    system = [("system", None, "system", 0.05, EARLIER)]
    assert earlier_turn(citation(grounded=0.1, context_grounded=5.0, context=system), 0.002) is None


def test_repeats():
    assert repeats("The Canopy API allows 10 requests.", EARLIER)
    assert repeats("the canopy api ALLOWS up to 10 requests per minute", EARLIER)
    assert repeats("The document also states that every full", "The document states that every full-time employee")
    assert not repeats("Parental leave lasts sixteen weeks.", EARLIER)
    assert not repeats("—", EARLIER)
