"""Estimators published for the reference `at2` package: loaded safely, converted, and scored identically."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from at2_rag import Attributor, ScoreEstimator
from at2_rag.attribution.estimator import load_reference_estimator
from at2_rag.errors import EstimatorFormatError, EstimatorMismatchError
from at2_rag.storage.reference_format import PUBLISHED_ESTIMATORS

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    {
        "id": "moon",
        "title": "Moon",
        "text": "The Moon orbits the Earth every 27 days. Its surface is covered in craters.",
    },
    {"id": "tea", "title": "Tea", "text": "Green tea is made from unoxidised leaves. It originated in China."},
    {"id": "rail", "title": "Railways", "text": "The first public steam railway opened in 1825 in England."},
]


def reference_payload(weights: torch.Tensor, layers: int, heads: int, bias: bool = False) -> dict:
    """Exactly the layout the reference package saves (see issue 7): plain dicts, strings and tensors."""
    state = collections.OrderedDict([("linear.weight", weights.reshape(1, -1).clone())])
    if bias:
        state["linear.bias"] = torch.tensor([0.25])
    return {
        "class": "LinearScoreEstimator",
        "state_dict": state,
        "feature_extractor": {
            "class": "AttentionFeatureExtractor",
            "kwargs": {"num_layers": layers, "num_heads": heads, "model_type": "llama"},
        },
        "kwargs": {"normalize": True, "non_negative": False, "bias": bias},
        "extras": {"note": "written by the test"},
    }


def test_reference_file_loads_with_weights_only_and_converts(tmp_path):
    w = torch.rand(6)
    path = tmp_path / "score_estimator.pt"
    torch.save(reference_payload(w, 2, 3), path)
    est = ScoreEstimator.from_pretrained(path)
    assert (est.num_layers, est.num_heads) == (2, 3)
    assert torch.equal(est.weights.detach(), w)
    assert est.metadata["reference_kwargs"]["normalize"] is True
    # a folder holding the file (the Hub repo layout) works too, and conversion can save our format
    folder_est = ScoreEstimator.from_pretrained(tmp_path)
    assert torch.equal(folder_est.weights, est.weights)
    saved = load_reference_estimator(path, model_id="org/model", save_to=tmp_path / "converted")
    again = ScoreEstimator.from_pretrained(tmp_path / "converted")
    assert torch.equal(again.weights, saved.weights) and again.model_id == "org/model"
    assert (tmp_path / "converted" / "model.safetensors").is_file()


class Payload:  # a class: unpickling it would run code, which must be refused
    def __init__(self) -> None:
        self.weights = torch.ones(4)


def test_file_needing_unpickling_code_is_refused(tmp_path):
    path = tmp_path / "score_estimator.pt"
    torch.save({"class": "LinearScoreEstimator", "payload": Payload()}, path)
    with pytest.raises(EstimatorFormatError, match="unpickle|weights_only"):
        ScoreEstimator.from_pretrained(path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update({"class": "MLPScoreEstimator"}), "LinearScoreEstimator"),
        (lambda d: d["feature_extractor"].update({"class": "Other"}), "AttentionFeatureExtractor"),
        (lambda d: d["state_dict"].pop("linear.weight"), "linear.weight"),
        (lambda d: d["feature_extractor"]["kwargs"].pop("num_heads"), "num_heads"),
        (lambda d: d["state_dict"].update({"linear.weight": torch.ones(1, 5)}), "num_layers x num_heads"),
    ],
)
def test_malformed_reference_files_are_refused(tmp_path, mutate, message):
    payload = reference_payload(torch.rand(6), 2, 3)
    mutate(payload)
    path = tmp_path / "score_estimator.pt"
    torch.save(payload, path)
    with pytest.raises(EstimatorFormatError, match=message):
        ScoreEstimator.from_pretrained(path)


def test_bias_is_ignored_with_a_warning(tmp_path, caplog):
    path = tmp_path / "score_estimator.pt"
    torch.save(reference_payload(torch.rand(6), 2, 3, bias=True), path)
    est = ScoreEstimator.from_pretrained(path)
    assert est.weights.numel() == 6
    assert "bias" in caplog.text


def test_reference_scores_equal_direct_weights_on_the_real_model(tmp_path, smollm):
    """Same head order and reduction: a reference-format file scores exactly like the same weights given directly,
    and a single-head file scores like that head's attention."""
    model, tokenizer = smollm
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(layers * heads, generator=g)
    weights /= weights.sum()
    path = tmp_path / "score_estimator.pt"
    torch.save(reference_payload(weights, layers, heads), path)

    query, answer = "When did the first public railway open?", "It opened in 1825 in England."
    from_reference = Attributor(model, tokenizer, estimator=str(path)).attribute(query, DOCS, answer=answer)
    direct = Attributor(
        model, tokenizer, estimator=ScoreEstimator(weights, num_layers=layers, num_heads=heads)
    ).attribute(query, DOCS, answer=answer)
    for doc_id, score in direct.document_scores().items():
        assert from_reference.document_scores()[doc_id] == pytest.approx(score, abs=1e-6)

    layer, head = 7, 4
    single = torch.zeros(layers * heads)
    single[layer * heads + head] = 1.0  # reference order: layer-major
    torch.save(reference_payload(single, layers, heads), path)
    ref_single = Attributor(model, tokenizer, estimator=str(path)).attribute(query, DOCS, answer=answer)
    ours = Attributor(model, tokenizer, estimator=ScoreEstimator.single_head(layer, head, layers, heads)).attribute(
        query, DOCS, answer=answer
    )
    assert ref_single.document_scores() == pytest.approx(ours.document_scores(), abs=1e-6)

    # and that head's score is its mean (over answer tokens) summed (over document tokens) eager attention
    attributor = Attributor(model, tokenizer, estimator=str(path))
    prompt = attributor.render(query, DOCS)
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    import copy

    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    ids = torch.tensor([prompt.input_ids + answer_ids])
    with torch.no_grad():
        att = eager(ids, output_attentions=True).attentions[layer][0, head]  # [N, N]
    p = prompt.num_tokens
    rows = att[p - 1 : p - 1 + len(answer_ids)]
    for i, (a, b) in enumerate(prompt.doc_token_spans):
        expected = rows[:, a:b].sum(-1).mean().item()
        assert ref_single.documents[i].score == pytest.approx(expected, abs=1e-5)


def test_reference_estimator_for_another_model_is_refused(tmp_path, smollm):
    model, tokenizer = smollm
    path = tmp_path / "score_estimator.pt"
    torch.save(reference_payload(torch.rand(32 * 32), 32, 32), path)
    with pytest.raises(EstimatorMismatchError, match="32 layers x 32 heads"):
        Attributor(model, tokenizer, estimator=str(path))


def test_convert_cli(tmp_path):
    path = tmp_path / "score_estimator.pt"
    torch.save(reference_payload(torch.rand(6), 2, 3), path)
    out = tmp_path / "converted"
    done = subprocess.run(
        [sys.executable, "-m", "at2_rag.cli", "convert-estimator", str(path), str(out), "--model-id", "org/m"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["num_layers"] == 2 and config["num_heads"] == 3 and config["model_id"] == "org/m"
    bad = tmp_path / "nope.pt"
    bad.write_bytes(b"not a torch file")
    failed = subprocess.run(
        [sys.executable, "-m", "at2_rag.cli", "convert-estimator", str(bad), str(tmp_path / "x")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert failed.returncode == 2 and "not a readable torch file" in failed.stderr


def test_published_estimators_are_listed():
    assert set(PUBLISHED_ESTIMATORS) == {
        "madrylab/at2-phi-4-mini-instruct",
        "madrylab/at2-llama-3.1-8b-instruct",
        "madrylab/at2-qwen2.5-7b-instruct",
        "madrylab/at2-gemma-3-4b-it",
    }


def _local_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Lay out a Hugging Face Hub cache entry exactly as huggingface_hub writes it (blobs, snapshot, ref)."""
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(blob)


def test_hub_ids_load_through_huggingface_hub_offline(tmp_path, monkeypatch):
    """The real snapshot_download path, served from a local Hub cache (no network here)."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    ref = tmp_path / "ref.pt"
    torch.save(reference_payload(torch.rand(6), 2, 3), ref)
    _local_hub_cache(cache, "madrylab/at2-qwen2.5-7b-instruct", {"score_estimator.pt": ref.read_bytes()})
    ours = ScoreEstimator(torch.rand(6), num_layers=2, num_heads=3, model_id="org/m")
    folder = ours.save_pretrained(tmp_path / "ours")
    _local_hub_cache(cache, "me/at2-m", {p.name: p.read_bytes() for p in folder.iterdir()})
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    published = ScoreEstimator.from_pretrained("madrylab/at2-qwen2.5-7b-instruct", cache_dir=str(cache))
    assert published.model_id == "Qwen/Qwen2.5-7B-Instruct" and published.num_layers == 2
    mine = ScoreEstimator.from_pretrained("me/at2-m", cache_dir=str(cache))
    assert torch.equal(mine.weights, ours.weights) and mine.model_id == "org/m"
    with pytest.raises(EstimatorFormatError, match="neither a local estimator"):
        ScoreEstimator.from_pretrained("me/not-there", cache_dir=str(cache))
