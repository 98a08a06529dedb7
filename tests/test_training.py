"""Training pipeline: labels, mask semantics, shards and resume, the loss, training, metrics, estimators."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from at2_rag import ScoreEstimator
from at2_rag.capture.masked import (
    ablated_answer_logit_probs,
    ablation_attention_mask,
    answer_logit_probs,
    full_attention_cache,
    log1mexp,
    random_masks,
    target_log_odds,
    target_log_prob,
    token_logit_probs,
)
from at2_rag.errors import EstimatorFormatError
from at2_rag.evaluation.baselines import lasso, leave_one_out_scores
from at2_rag.evaluation.metrics import lds, rankdata, spearman, top_k_mask
from at2_rag.training.data import CollectedExample, completed_ids, load_collected, read_examples, write_shard
from at2_rag.training.train import TargetBatch, correlation_loss, pearson, to_targets, train_estimator

ROOT = Path(__file__).resolve().parents[1]


# ---- labels -------------------------------------------------------------------------------------------
def test_token_logit_probs_match_direct_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 4
    targets = torch.randint(0, 11, (3, 5))
    lp = token_logit_probs(logits, targets)
    p = torch.softmax(logits.double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp.double(), torch.log(p) - torch.log1p(-p), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.nn.functional.logsigmoid(lp.double()), torch.log(p), atol=1e-5, rtol=1e-5)


def test_token_logit_probs_in_chunks_are_the_same_numbers(monkeypatch):
    """Large logits (a batch of masks x answer rows x a big vocabulary) are worked on a few rows at a time: the
    numbers are bit for bit those of one pass, for a non-contiguous slice too (the runner passes `logits[:, :-1]`)."""
    from at2_rag.capture import masked

    torch.manual_seed(2)
    logits = (torch.randn(7, 10, 301) * 4)[:, :-1]
    targets = torch.randint(0, 301, (7, 9))
    whole = token_logit_probs(logits, targets)
    for chunk in (1, 9 * 301, 2 * 9 * 301 + 5, 6 * 9 * 301):
        monkeypatch.setattr(masked, "TOKEN_CHUNK_ELEMENTS", chunk)
        assert torch.equal(token_logit_probs(logits, targets), whole)
        assert torch.equal(token_logit_probs(logits[0], targets[0]), whole[0])  # 2-D input: one pass


def test_target_log_odds_equals_direct_computation():
    torch.manual_seed(1)
    logits = torch.randn(4, 6, 9)
    targets = torch.randint(0, 9, (4, 6))
    lp = token_logit_probs(logits, targets)
    rows = [1, 2, 4]
    p_tokens = torch.softmax(logits.double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    p = p_tokens[:, rows].prod(-1)
    expected = torch.log(p / (1 - p))
    torch.testing.assert_close(target_log_odds(lp, rows).double(), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(target_log_prob(lp, rows).double(), torch.log(p), atol=1e-4, rtol=1e-5)


def test_log_odds_stable_at_extremes():
    # p close to 1 (log p = -1e-9) and tiny p (log p = -800) stay finite and correct
    x = torch.tensor([-1e-9, -0.3, -800.0], dtype=torch.double)
    expected = torch.tensor(
        [math.log(1 - math.exp(-1e-9)), math.log(1 - math.exp(-0.3)), -math.exp(-800.0)], dtype=torch.double
    )
    torch.testing.assert_close(log1mexp(x), expected, rtol=1e-6, atol=1e-300)
    big = torch.full((1, 3), 40.0)  # each token p ~ 1 - 4e-18
    assert torch.isfinite(target_log_odds(big, [0, 1, 2])).all()
    tiny = torch.full((1, 3), -300.0)
    torch.testing.assert_close(target_log_odds(tiny, [0, 1, 2]), torch.tensor([-900.0]), atol=1e-3, rtol=1e-6)


# ---- mask semantics -----------------------------------------------------------------------------------
def test_random_masks_keep_probability_and_determinism():
    m1 = random_masks(6, 4000, 0.5, torch.Generator().manual_seed(3))
    m2 = random_masks(6, 4000, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(m1, m2) and m1.dtype == torch.bool
    assert abs(m1.float().mean().item() - 0.5) < 0.02


def test_ablation_mask_zeroes_exactly_the_ablated_sources():
    spans = [(2, 5), (5, 9), (12, 12)]
    masks = torch.tensor([[True, False, True], [False, True, False]])
    att = ablation_attention_mask(15, spans, masks)
    assert att[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert att[1].tolist() == [1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_ablated_source_content_has_no_effect_but_kept_does(tiny_llama):
    """Ablation = attention-masking: the ablated tokens' content cannot reach the answer; positions unchanged."""
    ids = torch.randint(1, 64, (30,)).tolist()
    spans = [(3, 10), (10, 18)]
    keep_first = torch.tensor([[True, False]])
    att = ablation_attention_mask(len(ids), spans, keep_first)
    base = answer_logit_probs(tiny_llama, ids, 6, att)
    changed = list(ids)
    changed[10:18] = [(t + 7) % 63 + 1 for t in ids[10:18]]  # rewrite the ablated source
    torch.testing.assert_close(answer_logit_probs(tiny_llama, changed, 6, att), base, atol=1e-5, rtol=1e-5)
    changed_kept = list(ids)
    changed_kept[3:10] = [(t + 7) % 63 + 1 for t in ids[3:10]]  # rewrite the kept source
    assert (answer_logit_probs(tiny_llama, changed_kept, 6, att) - base).abs().max() > 1e-3
    # nothing ablated equals a plain forward pass
    full = answer_logit_probs(tiny_llama, ids, 6, torch.ones(1, len(ids), dtype=torch.long))
    logits = tiny_llama(torch.tensor([ids])).logits[:, -7:-1]
    torch.testing.assert_close(full, token_logit_probs(logits, torch.tensor([ids[-6:]])), atol=1e-5, rtol=1e-5)


def test_batched_ablations_equal_one_at_a_time(tiny_llama):
    ids = torch.randint(1, 64, (25,)).tolist()
    spans = [(2, 8), (8, 14), (14, 19)]
    masks = random_masks(3, 5, 0.5, torch.Generator().manual_seed(0))
    att = ablation_attention_mask(len(ids), spans, masks)
    batched = answer_logit_probs(tiny_llama, ids, 5, att, batch_size=5)
    single = torch.cat([answer_logit_probs(tiny_llama, ids, 5, att[i : i + 1], batch_size=1) for i in range(5)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3, 8, 33])
def test_shared_prefix_ablations_equal_full_passes(tiny_llama, batch_size):
    """Prefix sharing computes each distinct prompt prefix once yet gives the full passes' numbers."""
    assert full_attention_cache(tiny_llama) is not None  # the shared path really runs here
    gen = torch.Generator().manual_seed(batch_size)
    ids = torch.randint(1, 64, (60,), generator=gen).tolist()
    spans = [(4, 12), (12, 20), (23, 31), (31, 31), (35, 44)]  # adjacent, gapped and empty sources
    masks = torch.cat([torch.ones(1, 5, dtype=torch.bool), random_masks(5, 32, 0.5, gen)])
    full = answer_logit_probs(tiny_llama, ids, 9, ablation_attention_mask(len(ids), spans, masks))
    shared = ablated_answer_logit_probs(tiny_llama, ids, 9, spans, masks, batch_size=batch_size)
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-5)


def test_shared_prefix_falls_back_for_overlapping_sources_and_sliding_windows(tiny_llama):
    from transformers import MistralConfig, MistralForCausalLM

    ids = torch.randint(1, 64, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    masks = random_masks(3, 6, 0.5, torch.Generator().manual_seed(2))
    overlapping = [(2, 20), (5, 9), (22, 30)]  # a document and one of its sentences
    torch.testing.assert_close(
        ablated_answer_logit_probs(tiny_llama, ids, 5, overlapping, masks),
        answer_logit_probs(tiny_llama, ids, 5, ablation_attention_mask(len(ids), overlapping, masks)),
    )
    torch.manual_seed(0)
    sliding = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               sliding_window=8)).eval()
    spans = [(2, 10), (10, 18), (20, 28)]
    torch.testing.assert_close(
        ablated_answer_logit_probs(sliding, ids, 5, spans, masks),
        answer_logit_probs(sliding, ids, 5, ablation_attention_mask(len(ids), spans, masks)),
    )


def test_shared_prefix_equals_full_passes_on_the_real_model(smollm):
    from at2_rag import Attributor, ScoreEstimator

    model, tokenizer = smollm
    attributor = Attributor(model, tokenizer, estimator=ScoreEstimator.uniform(30, 9))
    docs = ["The Eiffel Tower is in Paris. It opened in 1889.", "Bananas are yellow when ripe.",
            "Paris is the capital of France.", "The Moon orbits the Earth."]
    request = {"query": "When did the Eiffel Tower open?", "documents": docs}
    run = attributor.run(attributor.prepare(request, max_new_tokens=12))
    ids = run.prompt.input_ids + run.answer.token_ids
    spans = run.prompt.doc_token_spans
    masks = torch.cat([torch.ones(1, 4, dtype=torch.bool), random_masks(4, 12, 0.5, torch.Generator().manual_seed(0))])
    a_len = len(run.answer.token_ids)
    full = answer_logit_probs(model, ids, a_len, ablation_attention_mask(len(ids), spans, masks))
    shared = ablated_answer_logit_probs(model, ids, a_len, spans, masks, batch_size=13)
    torch.testing.assert_close(shared, full, atol=1e-3, rtol=1e-4)
    sentence_spans = run.prompt.sentence_token_spans
    smasks = random_masks(len(sentence_spans), 6, 0.5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        ablated_answer_logit_probs(model, ids, a_len, sentence_spans, smasks),
        answer_logit_probs(model, ids, a_len, ablation_attention_mask(len(ids), sentence_spans, smasks)),
        atol=1e-3, rtol=1e-4,
    )


# ---- shards and resume --------------------------------------------------------------------------------
def _synthetic_collected(i: int, sources: int = 3, d: int = 6) -> CollectedExample:
    g = torch.Generator().manual_seed(i)
    return CollectedExample(
        id=f"ex{i}",
        features=torch.rand(2, sources, d, generator=g),
        masks=torch.rand(8, sources, generator=g) < 0.5,
        labels=torch.randn(2, 8, generator=g),
        full=torch.randn(2, generator=g),
        meta={"id": f"ex{i}", "answer": "A. B."},
    )


def test_shard_round_trip_and_no_partial_files(tmp_path):
    items = [_synthetic_collected(i) for i in range(3)]
    write_shard(tmp_path / "shard-a.safetensors", items[:2])
    write_shard(tmp_path / "shard-b.safetensors", items[1:])  # ex1 twice: loaded once
    loaded = load_collected(tmp_path)
    assert [e.id for e in loaded] == ["ex0", "ex1", "ex2"]
    for a, b in zip(items, loaded):
        assert torch.equal(a.features, b.features) and torch.equal(a.masks, b.masks) and torch.equal(a.labels, b.labels)
    assert completed_ids(tmp_path) == {"ex0", "ex1", "ex2"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_read_examples_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q"}\n')
    with pytest.raises(ValueError, match="documents"):
        read_examples(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_examples(bad)


@pytest.mark.slow
def test_collect_is_killed_and_resumes_without_loss_or_duplicates(tmp_path):
    """A real collection run on the embedded model is killed after its first shard and resumed."""
    docs = [
        {"id": "a", "text": "The Orion rover landed in 2031. It carries a drill."},
        {"id": "b", "text": "Basil grows best in warm weather. Water it daily."},
        {"id": "c", "text": "The Danube flows through ten countries."},
    ]
    examples = [{"id": f"q{i}", "query": q, "documents": docs} for i, q in enumerate(
        ["When did the Orion rover land?", "How should basil be watered?", "How many countries does the Danube cross?",
         "What does the rover carry?", "When does basil grow best?"])]
    src = tmp_path / "examples.jsonl"
    src.write_text("\n".join(json.dumps(e) for e in examples) + "\n")
    out = tmp_path / "shards"
    cmd = [sys.executable, "-m", "at2_rag.cli", "collect", str(src), str(out), "--num-masks", "4",
           "--max-new-tokens", "12", "--shard-size", "1", "--batch-size", "5"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline and not list(out.glob("shard-*.safetensors")):
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "collection finished before it could be killed: " + proc.stdout.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = completed_ids(out)
    assert 1 <= len(first) < 5
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    collected = load_collected(out)
    ids = [m["id"] for p in sorted(out.glob("shard-*.safetensors")) for m in json.loads(
        __import__("safetensors").safe_open(str(p), framework="pt").metadata()["examples"])]
    assert sorted(ids) == sorted(set(ids)), "an example was written twice"
    assert summary["collected"] + len(first) + summary["skipped"] == 5
    assert {e.id for e in collected} | set() >= first
    for ex in collected:
        assert ex.masks.shape == (4, 3) and ex.labels.shape[1] == 4 and ex.features.shape[1:] == (3, 270)
        assert torch.isfinite(ex.labels).all()


# ---- loss and training --------------------------------------------------------------------------------
def test_pearson_matches_numpy():
    torch.manual_seed(0)
    a, b = torch.randn(4, 20), torch.randn(4, 20)
    ours = pearson(a, b)
    for i in range(4):
        assert ours[i].item() == pytest.approx(np.corrcoef(a[i].numpy(), b[i].numpy())[0, 1], abs=1e-5)


def test_loss_is_negative_correlation_of_signed_predictions():
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # 1 target, 2 sources, 2 heads
    masks = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    w = torch.tensor([2.0, 1.0])
    pred = masks @ (feats[0] @ w)  # [3, 1, -1, -3]
    labels = pred * 5 + 1
    batch = TargetBatch.of_random_masks(feats, masks.unsqueeze(0), labels.unsqueeze(0))
    assert correlation_loss(w, batch).item() == pytest.approx(-1.0, abs=1e-6)
    batch_anti = TargetBatch.of_random_masks(feats, masks.unsqueeze(0), -labels.unsqueeze(0))
    assert correlation_loss(w, batch_anti).item() == pytest.approx(1.0, abs=1e-6)


def planted_examples(count: int, sources: int, true_w: torch.Tensor, prefix: str, seed: int):
    """Labels generated by a known head weighting (the signed sum of the sources' scores, plus a little noise)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(count):
        feats = torch.rand(2, sources, true_w.numel(), generator=g)
        masks = torch.rand(32, sources, generator=g) < 0.5
        signs = masks.float() * 2 - 1
        labels = torch.stack([signs @ (feats[t] @ true_w) for t in range(2)]) + 0.01 * torch.randn(2, 32, generator=g)
        examples.append(CollectedExample(f"{prefix}{i}", feats, masks, labels, labels[:, 0], {"id": f"{prefix}{i}"}))
    return examples


def test_training_recovers_a_planted_estimator():
    """Labels generated by a known head weighting: training must find weights that predict them."""
    layers, heads = 3, 4
    true_w = torch.zeros(layers * heads)
    true_w[5], true_w[9] = 0.7, 0.3
    examples = planted_examples(60, 4, true_w, "e", 0)
    est, report = train_estimator(examples, layers, heads, epochs=150, lr=1e-2, patience=200, progress=False)
    assert report["heldout_correlation"] > 0.95 > report["initial_heldout_correlation"]
    assert est.weights.abs().sum().item() == pytest.approx(1.0, abs=1e-5)
    assert int(est.weights.argmax()) == 5
    assert est.metadata["support_threshold"] > 0


def test_training_refuses_data_with_nothing_to_learn_or_to_stop_on():
    """Held-out targets whose labels never vary would make the early-stopping objective NaN, and the starting
    (uniform) weights would be saved as a trained estimator: an error naming the problem instead."""
    from at2_rag.errors import InvalidInputError
    from at2_rag.training.train import split_examples

    layers, heads = 3, 4
    true_w = torch.zeros(layers * heads)
    true_w[1] = 1.0
    examples = planted_examples(20, 4, true_w, "e", 3)
    held_ids = {ex.id for ex in split_examples(examples, 0.15, 0)[1]}  # the same order: the same split
    assert len(held_ids) == 3
    flat = [CollectedExample(ex.id, ex.features, ex.masks, torch.zeros_like(ex.labels), ex.full, ex.meta)
            if ex.id in held_ids else ex for ex in examples]
    with pytest.raises(InvalidInputError, match="none of the 3 held-out examples has a target whose labels vary"):
        train_estimator(flat, layers, heads, epochs=5, progress=False)
    constant = [CollectedExample(ex.id, ex.features, ex.masks, torch.zeros_like(ex.labels), ex.full, ex.meta)
                for ex in examples]
    with pytest.raises(InvalidInputError, match="no training target has labels that vary"):
        train_estimator(constant, layers, heads, epochs=5, progress=False)


def test_training_without_held_out_examples_runs_every_epoch_and_reports_no_held_out_numbers(tmp_path, caplog):
    """`heldout_fraction=0` holds out nothing (it used to hold out one example per set), and training data never
    stands in for held-out data (a one-example set used to early-stop on its own training targets and report their
    correlation as held-out): every epoch runs, the last weights are kept, and the held-out numbers are None, in
    the report, the saved config and the model card. A fraction outside [0, 1) is refused."""
    from at2_rag.errors import InvalidInputError
    from at2_rag.training.train import split_examples

    layers, heads = 3, 4
    true_w = torch.zeros(layers * heads)
    true_w[4] = 1.0
    examples = planted_examples(12, 4, true_w, "e", 5)
    trained_on, held = split_examples(examples, 0.0, 0)
    assert held == [] and sorted(ex.id for ex in trained_on) == sorted(ex.id for ex in examples)
    assert len(split_examples(examples[:1], 0.15, 0)[1]) == 0  # a one-example set is all training
    for examples_, fraction in ((examples, 0.0), (examples[:1], 0.15)):
        with caplog.at_level("WARNING", logger="at2_rag.training.train"):
            est, report = train_estimator(examples_, layers, heads, epochs=7, lr=1e-2, patience=2,
                                          heldout_fraction=fraction, progress=False)
        assert "no held-out examples" in caplog.text
        assert report["num_heldout_examples"] == report["num_heldout_targets"] == 0
        assert report["early_stopping"] is False
        assert report["epochs_run"] == report["best_epoch"] == 7  # patience 2 stops nothing
        assert report["heldout_correlation"] is None and report["initial_heldout_correlation"] is None
        assert report["heldout_example_ids"] == []
    assert int(est.weights.argmax()) == 4
    est.save_pretrained(tmp_path / "est")
    loaded = ScoreEstimator.from_folder(tmp_path / "est")
    assert loaded.metadata["heldout_correlation"] is None
    assert "Heldout correlation" not in (tmp_path / "est" / "README.md").read_text()
    for fraction in (-0.1, 1.0, 1.5):
        with pytest.raises(InvalidInputError, match="heldout_fraction must be at least 0 and below 1"):
            train_estimator(examples, layers, heads, epochs=1, heldout_fraction=fraction, progress=False)


def test_training_on_several_sets_splits_each_on_its_own():
    """Adding a second set (multi-turn conversations, say) leaves the first set's held-out examples as they were,
    so held-out numbers measured on that split stay honest; the sets may differ in their number of sources."""
    from at2_rag.training.train import split_examples

    layers, heads = 3, 4
    true_w = torch.zeros(layers * heads)
    true_w[2], true_w[7] = 0.6, 0.4
    single, multi = planted_examples(40, 4, true_w, "single-", 1), planted_examples(20, 9, true_w, "multi-", 2)
    est, report = train_estimator(
        single, layers, heads, epochs=100, lr=1e-2, patience=200, progress=False, more_examples=[multi]
    )
    alone = [ex.id for ex in split_examples(single, 0.15, 0)[1]] + [ex.id for ex in split_examples(multi, 0.15, 0)[1]]
    assert report["heldout_example_ids"] == alone
    assert report["num_examples"] == 60 and report["num_heldout_examples"] == len(alone) == 6 + 3
    assert report["heldout_correlation"] > 0.95
    assert "heldout_example_ids" not in est.metadata  # in training_report.json, not in the config


def test_to_targets_pads_sources():
    batch = to_targets([_synthetic_collected(0, sources=2), _synthetic_collected(1, sources=4)])
    assert batch.features.shape == (4, 4, 6) and batch.signs.shape == (4, 8, 4)
    assert batch.signs[0, :, 2:].abs().sum() == 0 and batch.features[0, 2:].abs().sum() == 0


# ---- metrics ------------------------------------------------------------------------------------------
def test_rankdata_and_spearman_hand_cases():
    assert rankdata(torch.tensor([10.0, 30.0, 20.0, 20.0])).tolist() == [1.0, 4.0, 2.5, 2.5]
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    # ranks [1,2,3,4] vs [2,1,4,3]: d^2 sum = 4, rho = 1 - 6*4/(4*15) = 0.6
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([2.0, 1, 4, 3])) == pytest.approx(0.6)
    assert math.isnan(spearman(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0])))


def test_lds_hand_case():
    scores = torch.tensor([3.0, 1.0, 0.0])
    masks = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    # predicted effects: 4, 3, 1, 0 ; actual ordered the same -> 1 ; reversed -> -1
    assert lds(scores, masks, torch.tensor([9.0, 5.0, 2.0, 1.0])) == pytest.approx(1.0)
    assert lds(scores, masks, torch.tensor([1.0, 2.0, 5.0, 9.0])) == pytest.approx(-1.0)


def test_top_k_mask_and_leave_one_out():
    assert top_k_mask(torch.tensor([0.1, 0.5, 0.3]), 1).tolist() == [True, False, True]
    assert top_k_mask(torch.tensor([0.1, 0.5, 0.3]), 2).tolist() == [True, False, False]
    assert top_k_mask(torch.tensor([0.1, 0.5]), 5).tolist() == [False, False]
    assert leave_one_out_scores(torch.tensor(2.0), torch.tensor([1.5, 2.0, -1.0])).tolist() == [0.5, 0.0, 3.0]


def test_lasso_soft_thresholds_an_orthogonal_design():
    # columns centred and orthogonal with variance 1: the solution is soft-thresholding of X^T y / n
    x = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    y = torch.tensor([3.0, 1.0, -1.0, -3.0]) + 7.0  # = 2*x0 + 1*x1 + 7
    b, c = lasso(x, y, alpha=0.5)
    assert b.tolist() == pytest.approx([1.5, 0.5], abs=1e-6)
    assert c == pytest.approx(7.0, abs=1e-6)
    b0, _ = lasso(x, y, alpha=5.0)
    assert b0.tolist() == [0.0, 0.0]


# ---- estimator files ----------------------------------------------------------------------------------
def test_estimator_round_trip_and_refusals(tmp_path):
    est = ScoreEstimator(torch.arange(12, dtype=torch.float32), num_layers=3, num_heads=4, model_id="org/m",
                         metadata={"support_threshold": 0.2})
    folder = est.save_pretrained(tmp_path / "est")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    again = ScoreEstimator.from_pretrained(folder)
    assert torch.equal(again.weights, est.weights) and again.model_id == "org/m"
    assert again.metadata["support_threshold"] == 0.2
    est.save_pretrained(folder)  # overwrite in place, atomically
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (folder / "model.safetensors").unlink()
    with pytest.raises(EstimatorFormatError):
        ScoreEstimator.from_pretrained(folder)
    with pytest.raises(EstimatorFormatError):
        ScoreEstimator(torch.ones(5), num_layers=2, num_heads=2)


@pytest.mark.slow
def test_collect_splits_examples_over_launched_processes(tmp_path):
    """Two processes (torchrun sets the same env as `accelerate launch` on several GPUs) take disjoint examples."""
    docs = [{"id": "a", "text": "Copper conducts electricity well."}, {"id": "b", "text": "Owls hunt at night."}]
    src = tmp_path / "examples.jsonl"
    src.write_text(
        "\n".join(
            json.dumps({"id": f"q{i}", "query": q, "documents": docs})
            for i, q in enumerate(["What conducts electricity?", "When do owls hunt?", "Is copper a metal?"])
        )
    )
    out = tmp_path / "shards"
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "at2_rag.cli", "collect", str(src), str(out),
         "--num-masks", "4", "--max-new-tokens", "8", "--shard-size", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted(s["rank"] for s in summaries) == [0, 1]
    ranks = {p.name.split("-")[1] for p in out.glob("shard-*.safetensors")}
    assert ranks == {"r00", "r01"}
    assert sorted(e.id for e in load_collected(out)) == ["q0", "q1", "q2"]
    assert sum(s["collected"] + s["skipped"] for s in summaries) == 3


def test_token_level_collection_features_add_up_to_the_documents(smollm):
    """`sources="tokens"`: every document token is its own source. Its features come from one more pass over
    the run's own tokens, and summed over a document's tokens they equal the document's own feature (the
    capture is exact, so an estimator trained on tokens applies to documents unchanged); labels are measured
    under masks over the tokens."""
    from at2_rag import Attributor
    from at2_rag.capture.features import target_features
    from at2_rag.evidence.layout import document_token_sources
    from at2_rag.prompting.answer import answer_targets
    from at2_rag.training.collect import collect_example
    from at2_rag.training.data import Example

    model, tokenizer = smollm
    att = Attributor(model, tokenizer)
    docs = ["The Eiffel Tower was built in 1889.", "Honey bees live in colonies of thousands."]
    example = Example(id="tok-1", query="When was the Eiffel Tower built?", documents=att.render("x", docs).documents)
    item = collect_example(att, example, num_masks=3, sources="tokens", max_new_tokens=10)
    assert item is not None and item.meta["sources"] == "tokens"
    run = att.run(att.prepare({"query": example.query, "documents": docs}, max_new_tokens=10))
    spans, ids = document_token_sources(run.prompt)
    assert item.meta["source_ids"] == ids and ids[0] == "doc0@0"
    assert spans == [(t, t + 1) for a, b in run.prompt.doc_token_spans for t in range(a, b)]
    assert item.features.shape[1:] == (len(spans), att.num_layers * att.num_heads)
    assert item.masks.shape == (3, len(spans)) and item.labels.shape == (item.features.shape[0], 3)
    for t, (_, rows) in enumerate(answer_targets(run.answer)):
        doc_level = target_features(run.token_features, rows)[:2]
        start = 0
        for d, (a, b) in enumerate(run.prompt.doc_token_spans):
            summed = item.features[t, start : start + b - a].sum(0)
            assert torch.allclose(summed, doc_level[d], rtol=1e-4, atol=1e-6)
            start += b - a


def test_whole_answer_targets(smollm):
    """`targets_of="answer"`: one target per example, the whole answer, its features and labels taken over
    every answer token that has text (what the Attributor scores as `result.documents`)."""
    from at2_rag import Attributor
    from at2_rag.capture.features import target_features
    from at2_rag.capture.masked import target_log_odds
    from at2_rag.training.collect import collect_example
    from at2_rag.training.data import Example

    model, tokenizer = smollm
    att = Attributor(model, tokenizer)
    docs = ["The Eiffel Tower was built in 1889. It is in Paris.", "Honey bees live in colonies."]
    example = Example(id="ans-1", query="Tell me about the Eiffel Tower.", documents=att.render("x", docs).documents)
    item = collect_example(att, example, num_masks=4, max_new_tokens=24, targets_of="answer")
    assert item is not None and item.features.shape[0] == 1 and item.labels.shape == (1, 4)
    assert item.meta["targets"] == [[0, len(item.meta["answer"])]] and item.meta["targets_of"] == "answer"
    run = att.run(att.prepare({"query": example.query, "documents": docs}, max_new_tokens=24))
    rows = [i for i, (a, b) in enumerate(run.answer.char_spans) if b > a]
    assert torch.allclose(item.features[0], target_features(run.token_features[:, :2], rows))
    ids = run.prompt.input_ids + run.answer.token_ids
    kept = torch.ones(1, 2, dtype=torch.bool)
    full = ablated_answer_logit_probs(att.model, ids, len(run.answer.token_ids), run.prompt.doc_token_spans, kept)
    assert torch.allclose(item.full[0], target_log_odds(full, rows)[0], atol=1e-4)


@pytest.mark.parametrize("kwargs", [{"sources": "words"}, {"targets_of": "paragraphs"}])
def test_collect_refuses_unknown_sources_or_targets_before_any_work(tmp_path, kwargs):
    from at2_rag import InvalidInputError
    from at2_rag.training.collect import collect

    with pytest.raises(InvalidInputError, match="sources must be one of .*tokens.* targets_of one of sentences"):
        collect([], tmp_path / "out", attributor=None, **kwargs)
    assert not (tmp_path / "out").exists()


# ---- leave-one-out masks ------------------------------------------------------------------------------
def test_weighted_pearson_ignores_unselected_masks():
    torch.manual_seed(1)
    a, b = torch.randn(3, 12), torch.randn(3, 12)
    padded_a, padded_b = torch.cat([a, torch.randn(3, 5) * 50], 1), torch.cat([b, torch.randn(3, 5) * 50], 1)
    weight = torch.cat([torch.ones(3, 12), torch.zeros(3, 5)], 1).bool()
    torch.testing.assert_close(pearson(padded_a, padded_b, weight), pearson(a, b))


def _with_leave_one_out(ex: CollectedExample, effects: torch.Tensor) -> CollectedExample:
    """The example's leave-one-out masks, with `effects[t, i]` the drop when source i alone is removed."""
    sources = ex.masks.shape[1]
    return CollectedExample(
        ex.id, ex.features, ~torch.eye(sources, dtype=torch.bool), ex.full[:, None] - effects, ex.full,
        {**ex.meta, "mask_kinds": ["leave_one_out"] * sources},
    )


def test_merge_adds_leave_one_out_masks_and_keeps_the_splits():
    from at2_rag import InvalidInputError
    from at2_rag.training.data import mask_kinds, merge_collected
    from at2_rag.training.train import split_examples

    base = [_synthetic_collected(i) for i in range(6)]
    base[0].meta["no_documents_mask"] = 7
    loo = [_with_leave_one_out(ex, torch.rand(2, 3)) for ex in base[2:5]]
    merged = merge_collected([base, loo], ["random", "loo"])
    assert len(merged) == 1 and [ex.id for ex in merged[0]] == [ex.id for ex in base]  # the loo set is absorbed
    assert [ex.id for ex in split_examples(merged[0], 0.3, 0)[1]] == [ex.id for ex in split_examples(base, 0.3, 0)[1]]
    assert mask_kinds(merged[0][0]) == ["random"] * 7 + ["no_documents"]
    third = merged[0][2]
    assert mask_kinds(third) == ["random"] * 8 + ["leave_one_out"] * 3
    assert third.masks.shape == (11, 3) and third.labels.shape == (2, 11)
    assert torch.equal(third.labels[:, 8:], loo[0].labels) and torch.equal(third.features, base[2].features)
    # masks of another answer would not describe these features
    other = _with_leave_one_out(base[1], torch.rand(2, 3))
    other.meta["answer"] = "Something else."
    with pytest.raises(InvalidInputError, match="'ex1' in loo has another answer than in random"):
        merge_collected([base, [other]], ["random", "loo"])


def test_training_with_leave_one_out_masks_learns_which_single_source_matters():
    """Random masks generated by one head weighting, leave-one-out effects by another (as when two sources
    repeat each other, removing one alone changes little): the leave-one-out term moves the estimator toward
    the single-removal ranking, which random masks alone do not teach."""
    from at2_rag.training.data import merge_collected

    layers, heads = 2, 3
    joint, single = torch.zeros(layers * heads), torch.zeros(layers * heads)
    joint[1], single[4] = 1.0, 1.0
    examples = planted_examples(60, 5, joint, "e", 3)
    loo = [_with_leave_one_out(ex, torch.stack([ex.features[t] @ single for t in range(2)]))
           for ex in examples]
    plain, _ = train_estimator(examples, layers, heads, epochs=60, lr=1e-2, patience=200, progress=False)
    (merged,) = merge_collected([examples, loo])
    both, report = train_estimator(merged, layers, heads, epochs=60, lr=1e-2, patience=200, progress=False)
    assert float(both.weights.detach()[4]) > float(plain.weights.detach()[4]) + 0.1
    assert report["leave_one_out_weight"] == 1.0 and report["heldout_leave_one_out_correlation"] > 0.5
    assert "leave_one_out_weight" not in train_estimator(examples, layers, heads, epochs=2, progress=False)[1]


def test_collect_records_leave_one_out_masks_on_the_real_model(att, tmp_path):
    from at2_rag import InvalidInputError
    from at2_rag.training.collect import collect, collect_example
    from at2_rag.training.data import Example, mask_kinds

    example = Example(id="loo-1", query="What does the cat eat?", documents=[
        "The cat eats fish every morning.", "The dog sleeps in the garden.", "Birds sing at dawn."])
    item = collect_example(att, example, num_masks=2, max_new_tokens=8, leave_one_out=True)
    assert item is not None
    assert mask_kinds(item) == ["random"] * 2 + ["leave_one_out"] * 3
    assert item.masks[2:].tolist() == [[False, True, True], [True, False, True], [True, True, False]]
    only = collect_example(att, example, num_masks=0, max_new_tokens=8, leave_one_out=True)
    assert only is not None and only.meta["answer"] == item.meta["answer"]
    torch.testing.assert_close(only.labels, item.labels[:, 2:], atol=1e-3, rtol=1e-4)  # the same passes
    with pytest.raises(InvalidInputError, match="num_masks must be positive"):
        collect([], tmp_path / "out", att, num_masks=0)


def test_collect_refuses_to_resume_a_folder_with_other_settings(att, tmp_path, caplog):
    """Resuming into a folder collected with other settings would skip its examples and mix two kinds of shards:
    an error naming each difference, before any model work; the same settings resume as before."""
    import json

    from at2_rag import InvalidInputError
    from at2_rag.training.collect import SETTINGS_FILE, collect
    from at2_rag.training.data import load_collected

    examples = [{"id": "cat", "query": "What does the cat eat?", "documents": [
        "The cat eats fish every morning.", "The dog sleeps in the garden."]}]
    out = tmp_path / "out"
    summary = collect(examples, out, att, num_masks=2, max_new_tokens=8, rank=0, world_size=1)
    assert summary["collected"] == 1
    settings = json.loads((out / SETTINGS_FILE).read_text())
    assert settings["num_masks"] == 2 and settings["leave_one_out"] is False and settings["model"] == att.model_id
    with pytest.raises(InvalidInputError, match=r"num_masks: 2 there, 0 now; .*leave_one_out: False there, True now"):
        collect(examples, out, att, num_masks=0, leave_one_out=True, max_new_tokens=8, rank=0, world_size=1)
    assert collect(examples, out, att, num_masks=2, max_new_tokens=8, rank=0, world_size=1)["collected"] == 0
    assert [ex.id for ex in load_collected(out)] == ["cat"]  # the settings file is not read as a shard
    assert (settings["num_layers"], settings["num_heads"]) == (att.num_layers, att.num_heads)
    # a settings file from before the model's shape was recorded resumes, and gets the shape added
    (out / SETTINGS_FILE).write_text(json.dumps({k: v for k, v in settings.items()
                                                 if k not in ("num_layers", "num_heads")}))
    assert collect(examples, out, att, num_masks=2, max_new_tokens=8, rank=0, world_size=1)["collected"] == 0
    assert json.loads((out / SETTINGS_FILE).read_text()) == settings
    # a folder from before settings were recorded resumes, with a warning, and is not stamped with these settings
    (out / SETTINGS_FILE).unlink()
    with caplog.at_level("WARNING", logger="at2_rag.training.collect"):
        assert collect(examples, out, att, num_masks=0, leave_one_out=True, max_new_tokens=8, rank=0,
                       world_size=1)["collected"] == 0
    assert "collected before settings were recorded" in caplog.text and not (out / SETTINGS_FILE).exists()
    (out / SETTINGS_FILE).write_text("[1, 2]")
    with pytest.raises(InvalidInputError, match="is not a collection settings file"):
        collect(examples, out, att, num_masks=2, max_new_tokens=8, rank=0, world_size=1)
    # a folder whose first run stopped before any shard (a bad example) takes the next run's settings
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / SETTINGS_FILE).write_text(json.dumps({**settings, "num_masks": 32}))
    assert collect(examples, empty, att, num_masks=0, leave_one_out=True, max_new_tokens=8, rank=0,
                   world_size=1)["collected"] == 1
    assert json.loads((empty / SETTINGS_FILE).read_text())["leave_one_out"] is True
