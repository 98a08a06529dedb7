"""`at2-rag train` writes the runtime settings the Attributor reads: the groundedness head and calibration
(`metadata["groundedness"]`) and the refinement prior (`metadata["refinement"]`), fitted on the weights' own
training split; a setting the data cannot fit is left out and said so (never silently). The last test runs the
CLI end to end on a tiny random model: collect (documents, and context sources with the all-documents-removed
mask), train, and an Attributor that uses both settings."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from at2_rag import Attributor, ScoreEstimator
from at2_rag.attribution.grounding import GroundednessCalibration, auroc
from at2_rag.attribution.refine import RefinementPrior
from at2_rag.cli import main
from at2_rag.training.data import CollectedExample, load_collected, write_shard
from at2_rag.training.groundedness import fit_groundedness_settings, no_documents_targets
from at2_rag.training.refinement import STRENGTHS, fit_refinement_prior
from at2_rag.training.runtime_settings import fit_runtime_settings

LAYERS, HEADS = 2, 4
D = LAYERS * HEADS
TRUE_W = torch.tensor([0.5, 0.0, 0.2, 0.0, 0.0, 0.3, 0.0, 0.0])  # the scores' heads
GROUNDING_W = torch.tensor([0.0, 2.0, 0.0, 0.0, 1.5, 0.0, 0.0, 0.0])  # other heads say "reads the documents"


def single_turn(count: int, seed: int, sources: int = 3, masks: int = 24, grounding: bool = True
                ) -> list[CollectedExample]:
    """Documents-only examples: labels are the signed sum of the kept sources' scores, except (with `grounding`)
    the masks that remove every document, whose label drops by what the grounding heads read (~1 nat around 1)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        feats = torch.rand(2, sources, D, generator=g)
        keep = torch.rand(masks, sources, generator=g) < 0.5
        keep[0] = False  # every example has a mask removing every document
        labels = torch.stack([(keep.float() * 2 - 1) @ (feats[t] @ TRUE_W) for t in range(2)])
        labels += 0.01 * torch.randn(labels.shape, generator=g)
        full = labels.mean(dim=1) - 4.0  # a sentence of low probability: its log-prob drop ~ its log-odds drop
        for t in range(2 if grounding else 0):
            labels[t, ~keep.any(dim=1)] = full[t] - (feats[t].sum(0) @ GROUNDING_W - 4.0)
        ex_id = f"s{seed}-{i}"
        out.append(CollectedExample(ex_id, feats, keep, labels, full, {
            "id": ex_id, "answer": "A. B.", "sources": "documents", "source_ids": [f"d{j}" for j in range(sources)],
            "num_documents": sources, "no_documents_mask": None}))
    return out


def conversations(count: int, seed: int, docs: int = 3, masks: int = 16) -> list[CollectedExample]:
    """`collect --sources context` examples: documents, system prompt, one earlier turn, question; random masks and
    a last mask removing every document, whose drop the earlier turn's grounding heads lower."""
    g = torch.Generator().manual_seed(seed)
    ids = [f"d{j}" for j in range(docs)] + ["system", "history:0", "question"]
    out = []
    for i in range(count):
        feats = torch.rand(2, len(ids), D, generator=g)
        keep = torch.cat([torch.rand(masks, len(ids), generator=g) < 0.5,
                          torch.tensor([[False] * docs + [True] * (len(ids) - docs)])])
        labels = torch.stack([(keep.float() * 2 - 1) @ (feats[t] @ TRUE_W) for t in range(2)])
        full = labels[:, :masks].mean(dim=1) - 4.0
        for t in range(2):
            drop = feats[t, :docs].sum(0) @ GROUNDING_W - 0.5 * feats[t, docs + 1] @ GROUNDING_W - 3.5
            labels[t, -1] = full[t] - drop
        ex_id = f"c{seed}-{i}"
        out.append(CollectedExample(ex_id, feats, keep, labels, full, {
            "id": ex_id, "answer": "A. B.", "sources": "context", "source_ids": ids, "num_documents": docs,
            "no_documents_mask": masks, "mask_kinds": ["random"] * masks + ["no_documents"]}))
    return out


def test_groundedness_head_is_fitted_on_the_all_documents_removed_targets():
    single, multi = single_turn(30, 0), conversations(20, 1)
    weights = TRUE_W / TRUE_W.abs().sum()
    fit = fit_groundedness_settings(single[:25] + multi, weights, single[25:])
    assert fit.reason is None
    s = fit.settings
    assert s is not None and len(s["document_weights"]) == len(s["history_weights"]) == D
    assert s["threshold"] == 1.0 and all(isinstance(s[k], float) for k in ("scale", "offset", "history_scale"))
    assert s["heldout_auroc_single_turn"]["n"] == 10 and s["heldout_auroc_single_turn"]["mean"] > 0.8
    assert "50 single-turn (training split) and 40 multi-turn (training split) targets" in s["fitted_on"]
    # the head learned the grounding heads (not the scores'): it predicts the drops it was fitted on
    targets = no_documents_targets(single[:25] + multi, weights)
    calibration = GroundednessCalibration.from_metadata({"groundedness": s}, fallback_scale=1.0, num_features=D)
    predicted = torch.tensor([
        calibration.grounded([], [], docs, hist) for docs, hist in
        zip(targets.document_features, targets.history_features)])
    capped = targets.rows[:, 2].clamp(-5, 5)
    assert float(torch.corrcoef(torch.stack([predicted, capped]))[0, 1]) > 0.9
    assert s["history_weights"][1] < 0 < s["document_weights"][1]  # an earlier turn's grounding lowers the drop
    assert auroc(predicted, targets.rows[:, 3] >= 1.0) > 0.9


def test_single_turn_data_fits_no_earlier_turn_weights_and_too_little_data_fits_nothing():
    weights = TRUE_W / TRUE_W.abs().sum()
    fit = fit_groundedness_settings(single_turn(12, 2), weights)
    assert fit.settings is not None and "history_weights" not in fit.settings and fit.settings["history_scale"] == 0
    assert "no training target has earlier turns" in str(fit.reason)
    assert "heldout_auroc_single_turn" not in fit.settings  # nothing held out: nothing claimed
    few = fit_groundedness_settings(single_turn(4, 3), weights)
    assert few.settings is None and "only 8 training target(s) have a mask removing every document" in str(few.reason)
    no_mask = [CollectedExample(ex.id, ex.features, ex.masks[1:] | True, ex.labels[:, 1:], ex.full, ex.meta)
               for ex in single_turn(12, 4)]
    assert fit_groundedness_settings(no_mask, weights).settings is None


def test_refinement_prior_is_chosen_on_the_random_masks():
    weights = TRUE_W / TRUE_W.abs().sum()
    prior, reason = fit_refinement_prior(single_turn(24, 5, grounding=False), weights)
    assert reason is None and prior is not None
    # labels are the signed sum of scores: one source flipped moves them by 2 * score, per unit of the L1-normed
    # weights' score that is 2 * |TRUE_W|_1 nats (keep bits 0/1 -> the slope of the sum of kept scores)
    assert prior["prior_scale"] == pytest.approx(2.0 * float(TRUE_W.abs().sum()), rel=0.05)
    assert prior["prior_strength"] in STRENGTHS and prior["scale_strength"] in STRENGTHS
    none, why = fit_refinement_prior(single_turn(3, 6, masks=3), weights)
    assert none is None and "too few to tune the prior" in str(why)


def test_runtime_settings_use_the_weights_own_split_and_say_what_falls_back(caplog):
    single, multi = single_turn(30, 0), conversations(20, 1)
    weights = TRUE_W / TRUE_W.abs().sum()
    settings = fit_runtime_settings([single, multi], weights)
    assert settings.summary() == {"groundedness": "fitted", "refinement": "fitted"}
    g, r = settings.metadata["groundedness"], settings.metadata["refinement"]
    # default: every conversation fits the head (their held-out evaluation is another file), single-turn: training
    assert "multi-turn (every example)" in g["fitted_on"] and "heldout_auroc_multi_turn" not in g
    assert r["chosen_on"] == "training split (26 examples), at2-rag train"  # the documents set alone
    split = fit_runtime_settings([single, multi], weights, conversations="training-split")
    assert split.metadata["groundedness"]["heldout_auroc_multi_turn"]["n"] == 6  # 3 held-out conversations
    with caplog.at_level(logging.WARNING, logger="at2_rag.training.runtime_settings"):
        alone = fit_runtime_settings([single_turn(4, 3)], weights)
    assert "groundedness" not in alone.metadata
    assert alone.summary()["groundedness"].startswith("not fitted: only 6 training target(s)")
    assert "falls back to the scores' scale" in caplog.text


def _approx(value):
    """`value` with every float compared within float noise (a refit may differ in the last bit)."""
    if isinstance(value, dict):
        return {k: _approx(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_approx(v) for v in value]
    return pytest.approx(value, rel=1e-9, abs=1e-12) if isinstance(value, float) else value


def _write_set(folder: Path, examples: list[CollectedExample]) -> Path:
    folder.mkdir(parents=True)
    write_shard(folder / "shard-00000.safetensors", examples)
    return folder


def test_train_cli_writes_one_folder_with_weights_settings_and_card(tmp_path, capsys):
    single = _write_set(tmp_path / "single", single_turn(30, 0))
    multi = _write_set(tmp_path / "multi", conversations(20, 1))
    out = tmp_path / "est"
    args = ["--num-layers", str(LAYERS), "--num-heads", str(HEADS), "--epochs", "20", "--lr", "1e-2"]
    assert main(["train", str(single), str(multi), str(out), *args]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["runtime_settings"] == {"groundedness": "fitted", "refinement": "fitted"}
    config = json.loads((out / "config.json").read_text())
    assert {"groundedness", "refinement", "training_data", "support_threshold"} <= set(config["metadata"])
    assert {"scale", "offset", "history_scale", "threshold", "document_weights", "history_weights", "head_offset",
            "heldout_auroc_single_turn", "fitted_on"} == set(config["metadata"]["groundedness"])
    assert set(config["metadata"]["refinement"]) == {"prior_scale", "prior_strength", "scale_strength", "chosen_on"}
    card = (out / "README.md").read_text()
    assert "chosen on: training split (26 examples), at2-rag train" in card
    assert json.loads((out / "training_report.json").read_text())["runtime_settings"]["refinement"] == "fitted"
    # --weights-from: the same weights, the same settings fitted again (the shipped estimator's rebuild path)
    again = tmp_path / "again"
    assert main(["train", str(single), str(multi), str(again), "--weights-from", str(out)]) == 0
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert json.loads((again / "config.json").read_text())["metadata"] == _approx(config["metadata"])
    # data that cannot fit groundedness: the folder is still written, and the console says what falls back
    few = _write_set(tmp_path / "few", single_turn(4, 3))
    capsys.readouterr()
    assert main(["train", str(few), str(tmp_path / "few-est"), *args, "--heldout-fraction", "0"]) == 0
    captured = capsys.readouterr()
    assert "at2-rag train: groundedness not fitted: only 8" in captured.err
    report = json.loads(captured.out)["runtime_settings"]
    assert report["groundedness"].startswith("not fitted: only 8") and report["refinement"] == "fitted"
    assert "groundedness" not in json.loads((tmp_path / "few-est" / "config.json").read_text())["metadata"]


def test_train_takes_the_feature_grid_from_collect_json_or_a_known_model_and_checks_it(tmp_path, capsys):
    single = _write_set(tmp_path / "single", single_turn(30, 0))
    out = tmp_path / "est"
    fast = ["--epochs", "2", "--heldout-fraction", "0"]

    def refused(*argv: str) -> str:
        assert main(["train", str(single), str(out), *argv, *fast]) == 2
        return capsys.readouterr().err

    # no collect.json: the embedded model's known grid (30 x 9) does not fit these shards' LAYERS x HEADS features
    assert (f"30 layers x 9 heads (from the known shape of HuggingFaceTB/SmolLM2-135M-Instruct) is 270 features per "
            f"source, but the shards have {LAYERS * HEADS}") in refused()
    assert "is not a known model: pass --num-layers and --num-heads" in refused("--model", "me/my-model")
    assert "pass both --num-layers and --num-heads, or neither" in refused("--num-layers", str(LAYERS))
    (single / "collect.json").write_text(json.dumps({"model": "me/my-model", "num_layers": HEADS,
                                                     "num_heads": LAYERS + 1}))
    assert "(from collect.json) is" in refused()
    assert not out.exists()  # nothing written on any of these errors
    (single / "collect.json").write_text(json.dumps({"model": "me/my-model", "num_layers": LAYERS,
                                                     "num_heads": HEADS}))
    assert main(["train", str(single), str(out), *fast]) == 0, capsys.readouterr().err
    estimator = ScoreEstimator.from_folder(out)
    assert (estimator.num_layers, estimator.num_heads, estimator.model_id) == (LAYERS, HEADS, "me/my-model")


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    """A random 2-layer, 4-head Llama with the embedded model's tokenizer, saved as a local model folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from at2_rag.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny-lm")
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


DOCS = [
    {"id": "rover", "text": "The Orion rover landed on Mars in 2031. It carries a drill and two cameras."},
    {"id": "basil", "text": "Basil grows best in warm weather with six hours of sun a day."},
    {"id": "tea", "text": "Green tea is steeped at 80 degrees for two minutes."},
]


def test_collect_train_and_the_attributor_uses_both_settings(tmp_path, tiny_model_folder, capsys):
    """The CLI path on a tiny random model: collect documents and conversations (with the all-documents-removed
    mask), train one folder, and an Attributor with it computes estimated `grounded` with the head and refines
    `ablations=k` with the prior."""
    questions = ["When did the rover land?", "How much sun does basil need?", "How hot is tea steeped?",
                 "What does the rover carry?", "Where did the rover land?", "When does basil grow best?"]
    single = tmp_path / "single.jsonl"
    single.write_text("".join(json.dumps({"id": f"q{i}", "query": q, "documents": DOCS}) + "\n"
                              for i, q in enumerate(questions)))
    multi = tmp_path / "multi.jsonl"
    multi.write_text("".join(json.dumps({
        "id": f"m{i}", "query": "And then?", "documents": DOCS,
        "history": [{"role": "user", "content": q}, {"role": "assistant", "content": "It is in the documents."}],
    }) + "\n" for i, q in enumerate(questions)))
    model = ["--model", str(tiny_model_folder)]
    fast = ["--num-masks", "12", "--max-new-tokens", "12", "--batch-size", "13"]
    assert main(["collect", str(single), str(tmp_path / "c-single"), *model, *fast]) == 0
    assert main(["collect", str(multi), str(tmp_path / "c-multi"), *model, *fast, "--sources", "context"]) == 0
    assert all(ex.meta["no_documents_mask"] == 12 for ex in load_collected(tmp_path / "c-multi"))
    capsys.readouterr()
    est = tmp_path / "est"
    recorded = json.loads((tmp_path / "c-single" / "collect.json").read_text())
    assert (recorded["num_layers"], recorded["num_heads"]) == (LAYERS, HEADS)
    # the shape comes from collect.json: no --num-layers/--num-heads for a model of one's own
    assert main(["train", str(tmp_path / "c-single"), str(tmp_path / "c-multi"), str(est), *model,
                 "--epochs", "5"]) == 0
    summary = json.loads(capsys.readouterr().out)["runtime_settings"]
    estimator = ScoreEstimator.from_folder(est)
    assert summary["refinement"] == "fitted" and "refinement" in estimator.metadata
    assert summary["groundedness"] == "fitted", summary  # every conversation target has the removed-all label
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(str(tiny_model_folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_folder))
    att = Attributor(lm, tokenizer, estimator=estimator)
    bare = ScoreEstimator(estimator.weights.detach().clone(), LAYERS, HEADS, trained=True,
                          metadata={k: v for k, v in estimator.metadata.items()
                                    if k not in ("groundedness", "refinement")})
    plain = Attributor(lm, tokenizer, estimator=bare)
    prior = estimator.metadata["refinement"]
    assert att.scorer.refinement == RefinementPrior(prior["prior_scale"], prior["prior_strength"],
                                                    prior["scale_strength"])
    assert plain.scorer.refinement != att.scorer.refinement
    head = att.scorer.groundedness(refined=False)
    assert head.calibrated and head.document_weights is not None and head.history_weights is not None
    assert torch.equal(head.document_weights,
                       torch.tensor(estimator.metadata["groundedness"]["document_weights"], dtype=torch.float64))
    assert plain.scorer.groundedness(refined=False).document_weights is None
    captured = att.run(att.prepare("When did the rover land?", DOCS, max_new_tokens=12))
    with_head = att.score(captured, groundedness="estimated").citations
    without = plain.score(captured, groundedness="estimated").citations
    assert with_head and [c.grounded for c in with_head] != [c.grounded for c in without]
    refined = att.score(captured, att.gather_evidence(captured, "estimated", 2), "estimated").citations
    refined_plain = plain.score(captured, plain.gather_evidence(captured, "estimated", 2), "estimated").citations
    assert [[d.score for d in c.documents] for c in refined] != [[d.score for d in c.documents] for c in refined_plain]
