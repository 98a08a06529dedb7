"""Stop strings (a base model's answer ends where it starts the next "Question:"): given to generate or named by
the model's generation config, generation ends there and the answer is the text before it, in a single run and
in a batch, with its features and logit-probs cut to the same tokens."""

from __future__ import annotations

import pytest
import torch

from at2_rag import Attributor

DOCS = [
    {"id": "a", "text": "The Eiffel Tower is in Paris. It was finished in 1889. It is 330 metres tall."},
    {"id": "b", "text": "Mount Fuji is the highest mountain in Japan."},
]
QUERY = "Tell me about the Eiffel Tower."

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plain(smollm):
    model, tokenizer = smollm
    att = Attributor(model, tokenizer)
    return att, att._runner.generate(att.render(QUERY, DOCS), max_new_tokens=40)


def test_generation_ends_at_a_given_stop_string(smollm, plain):
    att, full = plain
    assert "." in full.answer.text
    stop = "."
    run = att._runner.generate(att.render(QUERY, DOCS), max_new_tokens=40, stop_strings=[stop])
    assert run.finish_reason == "stop"
    assert stop not in run.answer.text
    assert full.answer.text.startswith(run.answer.text)
    n = len(run.answer.token_ids)
    assert 0 < n < len(full.answer.token_ids)
    assert run.answer.token_ids == full.answer.token_ids[:n]
    assert run.token_features.shape[0] == n == run.answer_logit_probs.shape[0]
    assert (run.token_features - full.token_features[:n]).abs().max().item() < 1e-5
    # a batch row stops at the same place
    batch = att._runner.generate_batch([att.render(QUERY, DOCS)], max_new_tokens=40, stop_strings=[stop])
    assert batch[0].answer.token_ids == run.answer.token_ids and batch[0].finish_reason == "stop"


def test_generation_config_stop_strings(smollm, plain):
    att, full = plain
    model = att.model
    before = getattr(model.generation_config, "stop_strings", None)
    model.generation_config.stop_strings = ["."]
    try:
        assert att._runner.stop_strings() == ["."]
        result = att.generate(QUERY, DOCS, max_new_tokens=40, groundedness="off")
    finally:
        model.generation_config.stop_strings = before
    assert result.finish_reason == "stop" and "." not in result.answer
    given = att.attribute(QUERY, DOCS, answer=result.answer, groundedness="off")
    a = torch.tensor([d.score for d in result.documents])
    b = torch.tensor([d.score for d in given.documents])
    assert (a - b).abs().max().item() < 1e-5
