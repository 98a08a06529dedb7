"""`ablations=k`: k ablation passes refine AT2's scores; k=0 is AT2 exactly, large k the ablation surrogate."""

from __future__ import annotations

import pytest
import torch

from at2_rag import InvalidInputError
from at2_rag.attribution.refine import RefinementPrior, refine_scores
from at2_rag.capture.masked import ablated_answer_logit_probs, target_log_odds
from at2_rag.evidence.ablations import choose_masks

DOCS = [
    "The Eiffel Tower is in Paris and was built in 1889.",
    "Mount Everest is 8849 metres tall.",
    "Honey bees live in colonies.",
]
QUERY = "When was the Eiffel Tower built?"
ANSWER = "It was built in 1889."


def least_squares(masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    design = torch.cat([torch.ones(masks.shape[0], 1, dtype=torch.double), masks.double()], dim=1)
    return torch.linalg.lstsq(design, labels.double().unsqueeze(1)).solution.squeeze(1)[1:]


def test_no_masks_returns_the_prior_and_many_masks_the_surrogate():
    torch.manual_seed(0)
    true = torch.tensor([3.0, 0.5, 0.0, -1.0, 2.0, 1.0, 0.0, 4.0], dtype=torch.double)
    prior = RefinementPrior(scale=10.0)
    scores = true.float() / 10 * 0.5 + 0.05 * torch.randn(8)  # a prior right in direction, wrong in scale
    assert torch.equal(refine_scores(scores, torch.zeros(0, 8, dtype=torch.bool), torch.zeros(0), prior), scores)
    masks = choose_masks(8, 256, "seed")  # every mask of 8 sources
    labels = masks.double() @ true + 0.7 + 0.01 * torch.randn(256, dtype=torch.double)
    refined = refine_scores(scores, masks, labels, prior).double() * prior.scale
    assert torch.allclose(refined, least_squares(masks, labels), atol=0.01)
    # a few masks: between the prior and the data, never worse than the prior's direction alone
    few = refine_scores(scores, masks[:3], labels[:3], prior).double() * prior.scale
    assert (few - true).norm() < (scores.double() * prior.scale - true).norm()


def test_masks_are_distinct_seeded_and_capped():
    a, b = choose_masks(4, 10, "x"), choose_masks(4, 10, "x")
    assert torch.equal(a, b) and a.shape == (10, 4)
    assert len({tuple(r.tolist()) for r in a}) == 10
    every = choose_masks(3, 100, "x")
    assert every.shape == (8, 3) and len({tuple(r.tolist()) for r in every}) == 8


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4", None])
def test_bad_ablations_are_clear_errors(att, bad):
    with pytest.raises(InvalidInputError, match="ablations"):
        att.attribute(QUERY, DOCS, answer=ANSWER, ablations=bad)


def test_zero_ablations_is_exactly_at2(att):
    plain = att.attribute(QUERY, DOCS, answer=ANSWER)
    zero = att.attribute(QUERY, DOCS, answer=ANSWER, ablations=0)
    assert zero.document_scores() == plain.document_scores()
    assert [c.model_dump() for c in zero.citations] == [c.model_dump() for c in plain.citations]
    assert zero.extra_forward_passes == plain.extra_forward_passes == 1  # the measured groundedness pass
    assert att.attribute(QUERY, DOCS, answer=ANSWER, groundedness="estimated").extra_forward_passes == 0


FIVE = DOCS + ["The Amazon river flows through Brazil.", "Gustave Eiffel's company designed the tower in 1884."]


def test_all_masks_approach_the_least_squares_surrogate_and_passes_are_counted(att):
    calls: list[int] = []
    hook = att.model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(1), with_kwargs=True)
    try:
        refined = att.attribute(QUERY, FIVE, answer=ANSWER, ablations=100)  # 5 documents: 32 distinct masks
    finally:
        hook.remove()
    # the documents-free pass, then the 32 masks but the two it and the run itself already measured
    assert refined.extra_forward_passes == 1 + 30
    assert len(calls) > 1  # the capture pass and the ablation passes really ran
    prior = att.attribute(QUERY, FIVE, answer=ANSWER)

    # the same masks and labels, computed independently of the Attributor (full passes, no prefix sharing)
    run = att.run(att.prepare({"query": QUERY, "documents": FIVE, "answer": ANSWER}))
    prompt, answer = run.prompt, run.answer
    masks = choose_masks(5, 32, prompt.text + "\x00" + answer.text)
    logit_probs = ablated_answer_logit_probs(
        att.model,
        prompt.input_ids + answer.token_ids,
        len(answer.token_ids),
        prompt.doc_token_spans,
        masks,
        share_prefixes=False,
    )
    rows = [i for i, (a, b) in enumerate(answer.char_spans) if b > a]
    surrogate = least_squares(masks, target_log_odds(logit_probs, rows))
    scale = RefinementPrior.from_metadata(att.estimator.metadata).scale
    got = torch.tensor(list(refined.document_scores().values()), dtype=torch.double) * scale
    at2 = torch.tensor(list(prior.document_scores().values()), dtype=torch.double) * scale
    # every mask observed: the data dominate the prior (which is off by an order of magnitude in scale here)
    assert (got - surrogate).norm() < 0.25 * (at2 - surrogate).norm(), (got, surrogate, at2)
    assert torch.argsort(got).tolist() == torch.argsort(surrogate).tolist()


def test_every_entry_point_takes_ablations(att):
    generated = att.generate(QUERY, DOCS, max_new_tokens=8, ablations=2)
    assert generated.extra_forward_passes == 2
    *_, streamed = att.stream(QUERY, DOCS, max_new_tokens=8, ablations=2)
    assert streamed.extra_forward_passes == 2 and streamed.document_scores() == generated.document_scores()
    messages = [{"role": "user", "content": "Context:\n" + "\n".join(DOCS) + "\n" + QUERY}]
    rendered = att.attribute_rendered(messages, DOCS, answer=ANSWER, ablations=3)
    assert rendered.extra_forward_passes == 3 and len(rendered.documents) == 3


VACATION = [
    "Employees get 25 vacation days per year. Vacation days are approved by your manager.",
    "Unused vacation days cannot be carried over to the next year.",
]
EARLIER = "You get 25 vacation days per year, approved by your manager."
TURNS = [
    {"role": "user", "content": "How many vacation days do I get per year?"},
    {"role": "assistant", "content": EARLIER},
]
FOLLOW_UP = "Can unused vacation days be carried over?"


def test_earlier_turns_and_document_sentences_refine_in_the_same_model(att):
    """2 documents + 2 earlier turns: 16 distinct masks. Every one observed, the refined scores of documents and
    turns are the ablation surrogate over all four; each document's sentences share its bit, so their refined
    scores add up to its effect; the system prompt and the question keep their AT2 scores."""
    refined = att.attribute(FOLLOW_UP, VACATION, answer=EARLIER, history=TURNS, ablations=50, groundedness="estimated")
    assert refined.extra_forward_passes == 15  # the 16 masks but everything kept, which the run itself measured
    measured = att.attribute(FOLLOW_UP, VACATION, answer=EARLIER, history=TURNS, ablations=50)
    # the documents-free and turns-free passes, then the 16 masks but the three they and the run already measured
    assert measured.extra_forward_passes == 2 + 13
    plain = att.attribute(FOLLOW_UP, VACATION, answer=EARLIER, history=TURNS)

    run = att.run(att.prepare({"query": FOLLOW_UP, "documents": VACATION, "answer": EARLIER, "history": TURNS}))
    prompt, answer = run.prompt, run.answer
    turns = [i for i, p in enumerate(prompt.context_parts) if p.kind == "history"]
    spans = prompt.doc_token_spans + [prompt.context_token_spans[i] for i in turns]
    masks = choose_masks(4, 16, prompt.text + "\x00" + answer.text)
    logit_probs = ablated_answer_logit_probs(
        att.model, prompt.input_ids + answer.token_ids, len(answer.token_ids), spans, masks, share_prefixes=False
    )
    rows = [i for i, (a, b) in enumerate(answer.char_spans) if b > a]
    surrogate = least_squares(masks, target_log_odds(logit_probs, rows))
    scale = RefinementPrior.from_metadata(att.estimator.metadata).scale

    def unit_scores(result):
        context = result.context_scores()
        values = list(result.document_scores().values()) + [context["history:0"], context["history:1"]]
        return torch.tensor(values, dtype=torch.double) * scale

    got, at2 = unit_scores(refined), unit_scores(plain)
    assert (got - surrogate).norm() < 0.25 * (at2 - surrogate).norm(), (got, surrogate, at2)
    assert int(got.argmax()) == int(surrogate.argmax()) == 3  # the repeated answer, ahead of both documents
    for doc in refined.documents:
        sentence_sum = sum(s.score for s in doc.sentences) * scale
        assert abs(sentence_sum - doc.score * scale) < 0.1 * abs(doc.score * scale) + 0.05, doc
    assert [s.score for d in refined.documents for s in d.sentences] != [
        s.score for d in plain.documents for s in d.sentences
    ]
    for key in ("system", "query"):
        assert refined.context_scores()[key] == plain.context_scores()[key]
    # groundedness under refinement is the surrogate's sum over the documents alone, in nats
    (citation,) = refined.citations
    assert citation.grounded == pytest.approx(sum(d.score for d in citation.documents) * scale, rel=1e-4)
