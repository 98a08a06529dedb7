"""The real Gemma 3 270M (base model, the optional `gemma` extra), on prompts longer than its 512-token sliding
window: the capture equals eager `output_attentions` (sliding and full layers), and an answer generated and
then attributed as given gets the same scores. Skipped when the Gemma packages are not installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_capture_equivalence import TOL, _reference_features, source_matrix

from at2_rag import Attributor, Document
from at2_rag.capture.attention import CAPTURE_PREFIX, capture_attention, install_capture
from at2_rag.errors import ModelNotAvailableError

pytestmark = pytest.mark.slow

TRAIN = Path(__file__).resolve().parents[1] / "data" / "rag_python_docs" / "train.jsonl"
EXAMPLE = 2  # 681 prompt tokens; greedy answer stops at a stop string
WINDOW = 512


@pytest.fixture(scope="module")
def gemma():
    from at2_rag.model_families import load_gemma3_270m

    try:
        model, tokenizer = load_gemma3_270m()
    except ModelNotAvailableError as exc:
        pytest.skip(f"optional model not available: {exc}")
    except ImportError as exc:  # converting the GGUF needs `gguf` and `accelerate`
        pytest.skip(f"converting the Gemma GGUF needs a missing package: {exc}")
    return model, tokenizer


@pytest.fixture(scope="module")
def example():
    lines = TRAIN.read_text(encoding="utf-8").splitlines()
    ex = json.loads(lines[EXAMPLE])
    docs = [Document(id=d["id"], title=d["title"], text=d["text"]) for d in ex["documents"]]
    return ex["query"], docs


def test_gemma_is_the_expected_model(gemma):
    model, tokenizer = gemma
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads) == (18, 4)
    assert config.sliding_window == WINDOW
    assert config.layer_types.count("full_attention") == 3
    assert tokenizer.chat_template is not None  # the plain RAG template of the converted folder


def test_gemma_capture_equals_eager_beyond_the_window(gemma, example, clone_model):
    from at2_rag.prompting.render import render_prompt

    model, tokenizer = gemma
    query, docs = example
    prompt = render_prompt(tokenizer, query, docs)
    p = prompt.num_tokens
    assert p > WINDOW + 100, "the prompt must outgrow the sliding window"
    assert prompt.input_ids[0] == tokenizer.bos_token_id
    spans = prompt.doc_token_spans + prompt.sentence_token_spans + prompt.context_token_spans  # runner's order
    assert spans[0][0] < p - WINDOW, "the first document must fall outside the last rows' window"
    matrix = source_matrix(p, spans)
    reference = clone_model(model)
    reference.set_attn_implementation("eager")
    install_capture(model)
    assert model.config._attn_implementation == f"{CAPTURE_PREFIX}sdpa"

    ids = torch.tensor([prompt.input_ids])
    n_new = 8
    with torch.no_grad(), capture_attention(model, spans, p - 1) as state:
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, stop_strings=None,
        )
    ref = _reference_features(reference, out, p, matrix)
    del reference
    got = state.features()[0]
    assert got.shape == ref.shape == (n_new, len(spans), 18 * 4)
    generate_diff = (got - ref).abs().max().item()

    with torch.no_grad(), capture_attention(model, spans, p - 1, p - 1 + n_new) as state2:
        model(out, use_cache=False)
    forward_diff = (state2.features()[0] - ref).abs().max().item()

    # the Attributor's own path (ModelRunner.generate: stop strings, answer-probability recorder)
    run = Attributor(model, tokenizer)._runner.generate(prompt, max_new_tokens=n_new)
    k = len(run.answer.token_ids)
    assert 0 < k <= n_new and run.answer.token_ids == out[0, p : p + k].tolist()
    runner_diff = (run.token_features - ref[:k]).abs().max().item()
    print(
        f"gemma capture vs eager, {p}-token prompt: generate {generate_diff:.3g}, forward {forward_diff:.3g}, "
        f"runner {runner_diff:.3g}"
    )
    assert generate_diff < TOL
    assert forward_diff < TOL
    assert runner_diff < TOL
    # sliding layers see nothing of the first document from the last rows; full layers do
    first_doc = ref[:, 0].reshape(n_new, 18, 4)
    sliding = [i for i, t in enumerate(model.config.layer_types) if t == "sliding_attention"]
    full = [i for i, t in enumerate(model.config.layer_types) if t == "full_attention"]
    assert torch.all(first_doc[:, sliding] == 0)
    assert torch.all(first_doc[:, full] > 0)


def test_gemma_generate_then_attribute_round_trip(gemma, example):
    model, tokenizer = gemma
    query, docs = example
    att = Attributor(model, tokenizer)
    generated = att.generate(query, docs, max_new_tokens=48, groundedness="off")
    assert generated.num_prompt_tokens > WINDOW + 100
    assert generated.answer.strip()
    for stop in att._runner.stop_strings():
        assert stop not in generated.answer, "the answer runs on past a stop string"
    given = att.attribute(query, docs, answer=generated.answer, groundedness="off")
    assert given.num_answer_tokens == generated.num_answer_tokens  # the answer's text re-tokenizes to its tokens
    a = torch.tensor([d.score for d in generated.documents])
    b = torch.tensor([d.score for d in given.documents])
    assert a.abs().sum() > 0
    assert (a - b).abs().max().item() < 1e-5, f"scores differ: {a.tolist()} vs {b.tolist()}"
    for x, y in zip(generated.citations, given.citations):
        assert x.text == y.text and [d.index for d in x.documents] == [d.index for d in y.documents]


def test_gemma_from_pretrained_on_its_gguf_file(gemma):
    """The assembled GGUF given by path is recognised as Gemma 3 270M: the same converted checkpoint (template,
    stop strings) and its shipped estimator; so is the family's short name."""
    from at2_rag.model_families import GEMMA3_270M_ID, gemma3_270m_gguf_path

    att = Attributor.from_pretrained(gemma3_270m_gguf_path())
    assert att.model_id == GEMMA3_270M_ID and att.estimator.trained
    assert (att.estimator.num_layers, att.estimator.num_heads) == (18, 4)
    assert att.tokenizer.chat_template == gemma[1].chat_template
    assert att._runner.stop_strings() == Attributor(*gemma)._runner.stop_strings()
    by_name = Attributor.from_pretrained("gemma3-270m")  # the family's short name, as `--model` takes it
    assert by_name.model_id == GEMMA3_270M_ID and by_name.estimator.model_id == GEMMA3_270M_ID
