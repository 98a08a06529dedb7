"""Batched attribution equals the single path: `generate_batch` / `attribute_batch` against `generate` /
`attribute`, on tiny Llama-style and sliding-window (Gemma-3) models and on the real embedded model."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from at2_rag import AttributionRequest, Attributor, InvalidInputError, ScoreEstimator

SCORE_TOL = 1e-4

DOCS_A = ["The Eiffel Tower opened in 1889 in Paris.", "Berlin is the capital of Germany."]
DOCS_B = [
    "Bees communicate by dancing to show where flowers are.",
    "Honey is made from nectar and stored in wax cells.",
    "A colony has one queen, thousands of workers and a few drones.",
]
REQUESTS = [
    {"query": "When did the Eiffel Tower open?", "documents": DOCS_A},
    {"query": "How do bees tell each other where flowers are, and what is honey made of?", "documents": DOCS_B},
    {"query": "Capital?", "documents": DOCS_A[1:], "system_prompt": None},
    {
        "query": "And the queen?",
        "documents": DOCS_B,
        "history": [
            {"role": "user", "content": "What is a colony?"},
            {"role": "assistant", "content": "A bee family."},
        ],
    },
]


def _tiny(kind: str, vocab: int):
    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, initializer_range=0.25, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **common)).eval()
    config = Gemma3TextConfig(
        num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], **common,
    )
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="module", params=["llama", "gemma3-window-8"])
def tiny_attributor(request, smollm):
    _, tokenizer = smollm
    model = _tiny(request.param, len(tokenizer))
    uniform = ScoreEstimator.uniform(*(model.config.num_hidden_layers, model.config.num_attention_heads))
    return Attributor(model, tokenizer, estimator=uniform, check_model_id=False)


def _scores(result):
    whole = [d.score for d in result.documents] + [s.score for d in result.documents for s in d.sentences]
    whole += [c.score for c in result.context_sources]
    per_sentence = [d.score for c in result.citations for d in c.documents]
    return torch.tensor(whole + per_sentence)


def _assert_same(batched, alone):
    assert batched.answer == alone.answer
    assert batched.num_answer_tokens == alone.num_answer_tokens
    assert batched.finish_reason == alone.finish_reason
    assert [d.id for d in batched.documents] == [d.id for d in alone.documents]
    assert [c.text for c in batched.citations] == [c.text for c in alone.citations]
    diff = (_scores(batched) - _scores(alone)).abs().max().item()
    assert diff <= SCORE_TOL, diff


def test_generate_batch_equals_generate_on_tiny_models(tiny_attributor):
    alone = [tiny_attributor.generate(r, max_new_tokens=9) for r in REQUESTS]
    batched = tiny_attributor.generate_batch(REQUESTS, max_new_tokens=9)
    lengths = {tiny_attributor.render(r).num_tokens for r in REQUESTS}
    assert len(lengths) == len(REQUESTS)  # every row padded differently
    for b, a in zip(batched, alone):
        _assert_same(b, a)


def test_attribute_batch_equals_attribute_on_tiny_models(tiny_attributor):
    answers = ["It opened in 1889.", "By dancing. Honey is made from nectar.", "Berlin.", "One queen per colony."]
    requests = [{**r, "answer": a} for r, a in zip(REQUESTS, answers)]
    alone = [tiny_attributor.attribute(r) for r in requests]
    batched = tiny_attributor.attribute_batch(requests)
    for b, a in zip(batched, alone):
        _assert_same(b, a)


def test_batches_on_the_real_model(att):
    requests = [AttributionRequest(**r) for r in REQUESTS[:3]]
    alone = [att.generate(r, max_new_tokens=24) for r in requests]
    batched = att.generate_batch(requests, max_new_tokens=24)
    for b, a in zip(batched, alone):
        _assert_same(b, a)
    # answers from elsewhere, batched: one forward pass for all
    forwarded = att.attribute_batch([{**r.model_dump(), "answer": a.answer} for r, a in zip(requests, alone)])
    for f, a in zip(forwarded, alone):
        diff = (_scores(f) - _scores(a)).abs().max().item()
        assert f.answer == a.answer and diff <= SCORE_TOL, diff


def test_batch_refinement_pays_its_passes_per_request(att):
    batched = att.generate_batch(REQUESTS[:2], max_new_tokens=12, ablations=2)
    assert [r.extra_forward_passes for r in batched] == [2, 2]
    alone = att.generate(REQUESTS[1], max_new_tokens=12, ablations=2)
    assert (_scores(batched[1]) - _scores(alone)).abs().max().item() <= SCORE_TOL


@pytest.mark.parametrize(
    "requests, match",
    [
        ("not a list", "list"),
        ([{"query": "q"}], "request 0: documents"),
        ([REQUESTS[0], {"query": "q", "documents": ["d"], "bogus": 1}], "request 1: bogus"),
        ([REQUESTS[0], 42], "request 1"),
    ],
)
def test_bad_batches_name_the_request(att, requests, match):
    with pytest.raises(InvalidInputError, match=match):
        att.generate_batch(requests, max_new_tokens=2)


def test_attribute_batch_needs_answers(att):
    with pytest.raises(InvalidInputError, match="request 1: attribute_batch needs"):
        att.attribute_batch([{**REQUESTS[0], "answer": "1889."}, REQUESTS[1]])


def test_empty_batch(att):
    assert att.generate_batch([], max_new_tokens=2) == []
    assert att.attribute_batch([]) == []
