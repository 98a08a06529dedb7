"""Measured groundedness: `grounded` is the exact drop of each sentence's log-odds when every document is removed,
checked against an independent masked forward pass (the ablations' convention) on the real model and on tiny
models of every attention family (sliding windows included)."""

from __future__ import annotations

import pytest
import torch
from test_capture_equivalence import CASES, NEW_TOKENS, PROMPT_LEN, SPANS, _build, _gemma3
from test_stream_citations import DOCS as TOUR_DOCS
from test_stream_citations import MAX_NEW_TOKENS as TOUR_TOKENS
from test_stream_citations import QUERY as TOUR_QUERY

from at2_rag import Attributor, InvalidInputError
from at2_rag.capture.masked import ablation_attention_mask, answer_logit_probs, target_log_odds
from at2_rag.evidence.groundedness import RemovedSourcesPass, removed_answer_logit_probs
from at2_rag.prompting.answer import answer_targets

pytestmark = pytest.mark.slow

DOCS = [
    {"id": "gpu", "title": "Hardware", "text": "The model was trained on 64 A100 GPUs. Training took three weeks."},
    {"id": "food", "title": "Cafeteria", "text": "The cafeteria serves pizza on Fridays and soup on Mondays."},
    {"id": "data", "title": "Data", "text": "The training data came from public web pages collected in 2021."},
]
QUERY = "What GPUs were used to train the model?"
HISTORY = [
    {"role": "user", "content": "How long did training take?"},
    {"role": "assistant", "content": "Training took three weeks on the cluster."},
]
TOL = 1e-4


def _masked_drops(model, run, spans) -> list[float]:
    """Independent reference: per answer sentence, log-odds with everything kept minus with `spans` masked out of
    attention, both from full teacher-forced passes over the whole sequence."""
    ids = run.prompt.input_ids + run.answer.token_ids
    keep = torch.tensor([[True] * len(spans), [False] * len(spans)])
    mask = ablation_attention_mask(len(ids), spans, keep)
    logit_probs = answer_logit_probs(model, ids, len(run.answer.token_ids), mask)
    drops = []
    for _, rows in answer_targets(run.answer):
        log_odds = target_log_odds(logit_probs, rows).double()
        drops.append(float(log_odds[0] - log_odds[1]))
    return drops


def _history_spans(prompt):
    return [s for p, s in zip(prompt.context_parts, prompt.context_token_spans) if p.kind == "history"]


def test_attribute_grounded_equals_an_independent_masked_pass(att, smollm):
    model, _ = smollm
    answer = "The model was trained on 64 A100 GPUs. I like pizza. It took three weeks."
    result = att.attribute(QUERY, DOCS, answer=answer)
    run = att.run(att.prepare({"query": QUERY, "documents": DOCS, "answer": answer}))
    expected = _masked_drops(model, run, run.prompt.doc_token_spans)
    assert result.groundedness == "measured"
    assert result.extra_forward_passes == 1
    assert len(result.citations) == len(expected) == 3
    for citation, drop in zip(result.citations, expected):
        assert citation.grounded == pytest.approx(drop, abs=TOL)
        assert citation.supported == (drop >= result.grounded_threshold)
        assert citation.context_grounded is None  # no earlier turns


def test_generate_grounded_equals_an_independent_masked_pass(att, smollm):
    model, _ = smollm
    result = att.generate(QUERY, DOCS, max_new_tokens=40)
    run = att.run(att.prepare({"query": QUERY, "documents": DOCS}, max_new_tokens=40))
    assert run.answer.text == result.answer
    expected = _masked_drops(model, run, run.prompt.doc_token_spans)
    assert [c.grounded for c in result.citations] == pytest.approx(expected, abs=TOL)
    assert result.extra_forward_passes == 1
    # the pass runs only the prompt outside the documents after the shared prefix, and the answer
    assert run.prefix_length == run.prompt.doc_token_spans[0][0] == run.prefix_cache.get_seq_length() > 0
    lengths: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        att.measure_groundedness(run)
    finally:
        hook.remove()
    documents = sum(b - a for a, b in run.prompt.doc_token_spans)
    assert lengths == [run.prompt.num_tokens - documents - run.prefix_length + len(run.answer.token_ids)]
    # the run's own logit-probs (recorded during generation) are the unmasked pass's
    ids = run.prompt.input_ids + run.answer.token_ids
    full = answer_logit_probs(model, ids, len(run.answer.token_ids), torch.ones(1, len(ids), dtype=torch.long))[0]
    assert torch.allclose(run.answer_logit_probs, full, atol=1e-3)


def test_conversation_measures_the_earlier_turns_too(att, smollm):
    model, _ = smollm
    answer = "Training took three weeks. The GPUs were 64 A100s."
    result = att.attribute(QUERY, DOCS, answer=answer, history=HISTORY)
    run = att.run(att.prepare({"query": QUERY, "documents": DOCS, "answer": answer, "history": HISTORY}))
    docs = _masked_drops(model, run, run.prompt.doc_token_spans)
    turns = _masked_drops(model, run, _history_spans(run.prompt))
    assert result.extra_forward_passes == 2
    for citation, doc_drop, turn_drop in zip(result.citations, docs, turns, strict=True):
        assert citation.grounded == pytest.approx(doc_drop, abs=TOL)
        assert citation.context_grounded == pytest.approx(turn_drop, abs=TOL)
        listed = any(c.kind == "history" for c in citation.context)
        assert listed == (turn_drop >= result.grounded_threshold)


def test_estimated_and_off_pay_nothing(att):
    answer = "The model was trained on 64 A100 GPUs."
    estimated = att.attribute(QUERY, DOCS, answer=answer, groundedness="estimated")
    off = att.attribute(QUERY, DOCS, answer=answer, groundedness="off")
    measured = att.attribute(QUERY, DOCS, answer=answer)
    assert (estimated.extra_forward_passes, off.extra_forward_passes, measured.extra_forward_passes) == (0, 0, 1)
    assert estimated.groundedness == "estimated" and off.groundedness == "off"
    assert off.citations[0].grounded is None and off.citations[0].supported and off.supported
    assert estimated.citations[0].grounded != pytest.approx(measured.citations[0].grounded)
    # the scores themselves do not depend on the groundedness mode
    assert estimated.document_scores() == measured.document_scores() == off.document_scores()


@pytest.mark.parametrize("mode", ["exact", "", None, 1, True])
def test_bad_groundedness_is_refused(att, mode):
    with pytest.raises(InvalidInputError, match="groundedness"):
        att.attribute(QUERY, DOCS, answer="An answer.", groundedness=mode)
    with pytest.raises(InvalidInputError, match="groundedness"):
        next(iter(att.stream(QUERY, DOCS, groundedness=mode)))


def test_streamed_sentence_citations_carry_their_measured_groundedness(att):
    items = list(att.stream(TOUR_QUERY, TOUR_DOCS, max_new_tokens=TOUR_TOKENS, sentence_citations=True))
    final = items[-1]
    streamed = [i for i in items if not isinstance(i, (str, type(final)))]
    assert final.groundedness == "measured" and final.extra_forward_passes == 1  # one pass in all, fed per sentence
    assert len(streamed) == len(final.citations) >= 2
    for early, last in zip(streamed, final.citations):
        assert early.grounded == pytest.approx(last.grounded, abs=TOL)
        assert early.supported == last.supported and early.cited == last.cited
    alone = att.generate(TOUR_QUERY, TOUR_DOCS, max_new_tokens=TOUR_TOKENS)
    assert [c.grounded for c in alone.citations] == pytest.approx([c.grounded for c in final.citations], abs=TOL)


def test_ablations_reuse_the_measured_passes(att):
    two = DOCS[:2]
    answer = "The model was trained on 64 A100 GPUs."
    # 2 documents have 4 masks: all of them, so everything kept and every document removed are among them
    refined = att.attribute(QUERY, two, answer=answer, ablations=4)
    assert refined.extra_forward_passes == 1 + 2  # the documents-free pass, then only the two masks not measured
    estimated = att.attribute(QUERY, two, answer=answer, ablations=4, groundedness="estimated")
    assert estimated.extra_forward_passes == 3  # the run itself answers the everything-kept mask
    assert refined.document_scores() == pytest.approx(estimated.document_scores(), abs=1e-3)


def test_batches_equal_single_requests(att):
    requests = [{"query": QUERY, "documents": DOCS}, {"query": "What is served on Fridays?", "documents": DOCS}]
    batch = att.generate_batch(requests, max_new_tokens=24)
    for request, result in zip(requests, batch):
        alone = att.generate(request, max_new_tokens=24)
        assert result.answer == alone.answer and result.extra_forward_passes == 1
        assert [c.grounded for c in result.citations] == pytest.approx([c.grounded for c in alone.citations], abs=1e-3)
    answered = [dict(r, answer=b.answer) for r, b in zip(requests, batch)]
    for request, result in zip(answered, att.attribute_batch(answered)):
        alone = att.attribute(request)
        assert [c.grounded for c in result.citations] == pytest.approx([c.grounded for c in alone.citations], abs=TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_removed_sources_pass_equals_the_masked_pass_on_every_family(case):
    """Full-attention models drop the removed tokens (positions kept); sliding-window models mask them. Either
    way the answer's logit-probs equal a full masked pass, also when fed in pieces."""
    model, _ = _build(case)
    torch.manual_seed(1)
    ids = torch.randint(3, 96, (PROMPT_LEN + NEW_TOKENS,)).tolist()
    prompt, answer = ids[:PROMPT_LEN], ids[PROMPT_LEN:]
    removed = [SPANS[0], SPANS[3]]
    mask = ablation_attention_mask(len(ids), removed, torch.tensor([[False, False]]))
    expected = answer_logit_probs(model, ids, NEW_TOKENS, mask)[0]
    assert torch.allclose(removed_answer_logit_probs(model, prompt, answer, removed), expected, atol=1e-4)
    pieces = RemovedSourcesPass(model, prompt, removed)
    fed = torch.cat([pieces.extend(answer[:3]), pieces.extend(answer[3:4]), pieces.extend(answer[4:])])
    assert torch.allclose(fed, expected, atol=1e-4)


def test_a_source_over_the_last_prompt_token_is_masked_not_dropped():
    model, _ = _build("llama")
    ids = list(range(3, 16))
    removed = [(5, 10)]  # the prompt is ids[:10]: the removed source holds its last token
    mask = ablation_attention_mask(len(ids), removed, torch.tensor([[False]]))
    expected = answer_logit_probs(model, ids, 3, mask)[0]
    assert torch.allclose(removed_answer_logit_probs(model, ids[:10], ids[10:], removed), expected, atol=1e-4)


def test_attributor_on_a_sliding_window_model_measures_with_the_mask(smollm):
    """A tiny Gemma-3 (window 8, far shorter than the prompt) through the public API: the measured drop equals
    the masked pass (the sliding-window path keeps every position)."""
    _, tokenizer = smollm
    from at2_rag import ScoreEstimator

    cls, config = _gemma3(8, ["sliding_attention", "full_attention", "sliding_attention"])
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = cls(config).eval()
    uniform = ScoreEstimator.uniform(3, 4)
    attributor = Attributor(model, tokenizer, estimator=uniform, check_model_id=False)
    answer = "Sixty four GPUs. Three weeks."
    result = attributor.attribute(QUERY, DOCS, answer=answer)
    run = attributor.run(attributor.prepare({"query": QUERY, "documents": DOCS, "answer": answer}))
    expected = _masked_drops(model, run, run.prompt.doc_token_spans)
    assert [c.grounded for c in result.citations] == pytest.approx(expected, abs=TOL)


def test_a_run_without_its_own_logit_probs_is_measured_by_one_more_pass(att):
    """Beam search or assisted decoding is not recorded step by step: the answer's own logit-probs are then
    measured too (one more pass), with the same result."""
    import dataclasses

    answer = "The model was trained on 64 A100 GPUs. It took three weeks."
    run = att.run(att.prepare({"query": QUERY, "documents": DOCS, "answer": answer}))
    recorded = att.score(run, att.gather_evidence(run))
    unrecorded = att.score(unrec := dataclasses.replace(run, answer_logit_probs=None), att.gather_evidence(unrec))
    assert unrecorded.extra_forward_passes == recorded.extra_forward_passes + 1 == 2
    expected = [c.grounded for c in recorded.citations]
    assert [c.grounded for c in unrecorded.citations] == pytest.approx(expected, abs=TOL)


def test_a_document_that_ends_the_prompt_is_measured_with_the_mask(att, smollm):
    """A prompt rendered elsewhere may end inside a document: the row that predicts the answer then belongs to a
    removed source, so the pass masks instead of dropping tokens (still exact)."""
    model, _ = smollm
    text = DOCS[0]["text"]
    prompt = f"Question: {QUERY}\nContext: {text}"
    result = att.attribute_rendered(prompt, [text], answer=" 64 A100 GPUs.")
    run = att.run(att.prepare(prompt=prompt, documents=[text], answer=" 64 A100 GPUs."))
    assert run.prompt.doc_token_spans[0][1] == run.prompt.num_tokens  # the document holds the last prompt token
    expected = _masked_drops(model, run, run.prompt.doc_token_spans)
    assert [c.grounded for c in result.citations] == pytest.approx(expected, abs=TOL)
