"""Estimator files are untrusted: every malformed field is an EstimatorFormatError naming the file and the field.

Each bad case below used to crash (AttributeError, ValueError, TypeError), load silently wrong ("false" as True,
9.5 as 9, an int tensor as weights) or fail with a message naming neither the file nor the field. Only the public
API is used, so the cases can be run against an older at2-rag to see that.
"""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from at2_rag import ScoreEstimator
from at2_rag.attribution.estimator import load_reference_estimator
from at2_rag.errors import EstimatorFormatError

Mutation = Callable[[dict[str, Any]], None]


def saved_estimator(tmp_path: Path) -> Path:
    """A valid 2 x 3 estimator folder, as save_pretrained writes it."""
    est = ScoreEstimator(torch.rand(6), num_layers=2, num_heads=3, model_id="org/m",
                         metadata={"support_threshold": 0.1, "training_data": "t.jsonl"})
    return est.save_pretrained(tmp_path / "est")


def rewrite_config(folder: Path, mutate: Mutation) -> Path:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    mutate(config)
    path.write_text(json.dumps(config))
    return path


def setter(key: str, value: Any) -> Mutation:
    return lambda c: c.__setitem__(key, value)


def meta_setter(key: str, value: Any) -> Mutation:
    return lambda c: c["metadata"].__setitem__(key, value)


def dropper(key: str) -> Mutation:
    return lambda c: c.pop(key)


def assert_refused(folder_or_file: Path, file: Path, *fragments: str) -> str:
    with pytest.raises(EstimatorFormatError) as info:
        ScoreEstimator.from_pretrained(folder_or_file)
    message = str(info.value)
    assert str(file) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---- config.json ---------------------------------------------------------------------------------------
BAD_CONFIG_FIELDS = [
    # (case id, mutation, field named in the message, what was wrong)
    ("model_id-int", setter("model_id", 123), "'model_id'", "valid string"),
    ("model_id-list", setter("model_id", ["org/m"]), "'model_id'", "valid string"),
    ("num_layers-word", setter("num_layers", "abc"), "'num_layers'", "valid integer"),
    ("num_layers-numeric-string", setter("num_layers", "2"), "'num_layers'", "valid integer"),
    ("num_layers-float", setter("num_layers", 2.0), "'num_layers'", "valid integer"),
    ("num_layers-bool", setter("num_layers", True), "'num_layers'", "valid integer"),
    ("num_layers-null", setter("num_layers", None), "'num_layers'", "valid integer"),
    ("num_layers-zero", setter("num_layers", 0), "'num_layers'", "greater than 0"),
    ("num_layers-negative", setter("num_layers", -2), "'num_layers'", "greater than 0"),
    ("num_layers-missing", dropper("num_layers"), "'num_layers'", "Field required"),
    ("num_heads-fraction", setter("num_heads", 3.5), "'num_heads'", "valid integer"),
    ("num_heads-string", setter("num_heads", "3"), "'num_heads'", "valid integer"),
    ("num_heads-negative", setter("num_heads", -3), "'num_heads'", "greater than 0"),
    ("num_heads-missing", dropper("num_heads"), "'num_heads'", "Field required"),
    ("trained-string", setter("trained", "false"), "'trained'", "valid boolean"),
    ("trained-int", setter("trained", 0), "'trained'", "valid boolean"),
    ("trained-null", setter("trained", None), "'trained'", "valid boolean"),
    ("format-other", setter("format", "peft"), "'format'", "at2-rag-estimator"),
    ("format-int", setter("format", 1), "'format'", "at2-rag-estimator"),
    ("feature_version-string", setter("feature_version", "1"), "'feature_version'", "valid integer"),
    ("feature_version-float", setter("feature_version", 1.0), "'feature_version'", "valid integer"),
    ("feature_version-other", setter("feature_version", 2), "'feature_version'", "feature version 2"),
    ("feature_definition-int", setter("feature_definition", 5), "'feature_definition'", "valid string"),
    ("metadata-list", setter("metadata", [1, 2]), "'metadata'", "valid dictionary"),
    ("metadata-string", setter("metadata", "x"), "'metadata'", "valid dictionary"),
    ("metadata-int", setter("metadata", 5), "'metadata'", "valid dictionary"),
    ("support_threshold-string", meta_setter("support_threshold", "x"), "'metadata.support_threshold'", "valid number"),
    ("support_threshold-bool", meta_setter("support_threshold", True), "'metadata.support_threshold'", "valid number"),
    ("support_threshold-null", meta_setter("support_threshold", None), "'metadata.support_threshold'", "valid number"),
    ("support_threshold-list", meta_setter("support_threshold", [0.1]), "'metadata.support_threshold'", "valid number"),
    ("support_threshold-nan", meta_setter("support_threshold", math.nan), "'metadata.support_threshold'", "finite"),
    ("support_threshold-minus-inf", meta_setter("support_threshold", -math.inf), "'metadata.support_threshold'",
     "finite"),
    ("evaluation-string", meta_setter("evaluation", "good"), "'metadata.evaluation'", "valid dictionary"),
    ("evaluation-summary-list", meta_setter("evaluation", {"summary": [1]}), "'metadata.evaluation.summary'",
     "valid dictionary"),
    ("evaluation-row-number", meta_setter("evaluation", {"summary": {"at2": 0.5}}),
     "'metadata.evaluation.summary.at2'", "valid dictionary"),
    ("unknown-key", setter("trainedd", False), "'trainedd'", "Extra inputs are not permitted"),
]


@pytest.mark.parametrize("mutate, field, problem", [c[1:] for c in BAD_CONFIG_FIELDS],
                         ids=[c[0] for c in BAD_CONFIG_FIELDS])
def test_bad_config_field_is_refused_naming_file_and_field(tmp_path, mutate, field, problem):
    folder = saved_estimator(tmp_path)
    path = rewrite_config(folder, mutate)
    assert_refused(folder, path, field, problem)


BAD_CONFIG_BYTES = [
    ("invalid-json", b"{not json", "not valid JSON"),
    ("empty", b"", "not valid JSON"),
    ("truncated", b'{"num_layers": 2, "num_he', "not valid JSON"),
    ("not-utf8", '{"num_layers": 2, "num_heads": 3, "model_id": "caf\u00e9"}'.encode("latin-1"), "not UTF-8"),
    ("duplicate-key", b'{"num_layers": 2, "num_heads": 3, "num_heads": 4}', "duplicate key 'num_heads'"),
    ("too-deep", b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ("list", b"[2, 3]", "JSON object"),
    ("string", b'"config"', "JSON object"),
    ("null", b"null", "JSON object"),
]


@pytest.mark.parametrize("data, problem", [c[1:] for c in BAD_CONFIG_BYTES], ids=[c[0] for c in BAD_CONFIG_BYTES])
def test_unreadable_config_is_refused_naming_the_file(tmp_path, data, problem):
    folder = saved_estimator(tmp_path)
    (folder / "config.json").write_bytes(data)
    assert_refused(folder, folder / "config.json", problem)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_missing_file_is_named(tmp_path, missing):
    folder = saved_estimator(tmp_path)
    (folder / missing).unlink()
    assert_refused(folder, folder / missing, "missing")


# ---- model.safetensors ---------------------------------------------------------------------------------
BAD_WEIGHTS = [
    # (case id, tensors written, what was wrong)
    ("int-dtype", {"weights": torch.arange(6)}, "dtype I64"),
    ("bool-dtype", {"weights": torch.ones(6, dtype=torch.bool)}, "dtype BOOL"),
    ("transposed-grid", {"weights": torch.rand(3, 2)}, "shape [3, 2]"),
    ("row-vector", {"weights": torch.rand(1, 6)}, "shape [1, 6]"),
    ("too-few", {"weights": torch.rand(5)}, "shape [5]"),
    ("too-many", {"weights": torch.rand(7)}, "shape [7]"),
    ("nan", {"weights": torch.tensor([0.1, math.nan, 0.1, 0.1, 0.1, 0.1])}, "NaN or infinite"),
    ("inf", {"weights": torch.tensor([0.1, math.inf, 0.1, 0.1, 0.1, 0.1])}, "NaN or infinite"),
    ("float64-overflow", {"weights": torch.full((6,), 1e300, dtype=torch.float64)}, "NaN or infinite"),
    ("extra-tensor", {"weights": torch.rand(6), "bias": torch.zeros(1)}, "exactly one tensor"),
]


@pytest.mark.parametrize("tensors, problem", [c[1:] for c in BAD_WEIGHTS], ids=[c[0] for c in BAD_WEIGHTS])
def test_bad_weights_tensor_is_refused_naming_the_file(tmp_path, tensors, problem):
    folder = saved_estimator(tmp_path)
    save_file(tensors, str(folder / "model.safetensors"))
    message = assert_refused(folder, folder / "model.safetensors", problem)
    assert "'weights'" in message


def test_wrongly_named_weights_tensor_is_refused(tmp_path):
    """(Refused before too; kept so the stricter check never lets it through.)"""
    folder = saved_estimator(tmp_path)
    save_file({"weight": torch.rand(6)}, str(folder / "model.safetensors"))
    assert_refused(folder, folder / "model.safetensors", "'weights'", "'weight'")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "header-only"])
def test_unreadable_safetensors_is_refused_naming_the_file(tmp_path, damage):
    folder = saved_estimator(tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"garbage": b"\x00garbage" * 10, "truncated": data[:-7], "empty": b"",
                      "header-only": data[:8]}[damage])
    assert_refused(folder, path, "not a readable safetensors file")


# ---- what is valid still loads, and save/load is symmetric ----------------------------------------------
def test_valid_folder_loads_and_round_trips(tmp_path):
    weights = torch.randn(6)
    metadata = {
        "support_threshold": 0.25,
        "training_data": "data.jsonl",
        "nested": {"a": [1, 2.5, None, "x"]},
        "evaluation": {"num_examples": 3, "summary": {"at2": {"lds": math.nan, "top1_drop": 1.5}}},
    }
    est = ScoreEstimator(weights, num_layers=2, num_heads=3, model_id=None, trained=False, metadata=metadata)
    folder = est.save_pretrained(tmp_path / "est")
    again = ScoreEstimator.from_pretrained(folder)
    assert torch.equal(again.weights, est.weights)
    assert (again.num_layers, again.num_heads, again.model_id, again.trained) == (2, 3, None, False)
    assert json.dumps(again.metadata, sort_keys=True) == json.dumps(metadata, sort_keys=True)  # NaN == NaN here
    # and what was loaded saves again unchanged
    again.save_pretrained(tmp_path / "est2")
    assert (tmp_path / "est2" / "config.json").read_text() == (folder / "config.json").read_text()
    assert (tmp_path / "est2" / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


def test_infinite_support_threshold_round_trips(tmp_path):
    """Training writes +inf when it finds no positive score scale ("never supported"): what save writes must load."""
    est = ScoreEstimator(torch.rand(6), 2, 3, metadata={"support_threshold": math.inf})
    again = ScoreEstimator.from_pretrained(est.save_pretrained(tmp_path / "est"))
    assert again.metadata["support_threshold"] == math.inf


def test_lenient_but_unambiguous_forms_still_load(tmp_path):
    """Optional keys may be absent or null, an integer threshold is a number, weights may be a [L, H] grid in
    any float dtype: none of these is ambiguous."""
    folder = saved_estimator(tmp_path)
    config = {"num_layers": 2, "num_heads": 3, "model_id": None, "metadata": {"support_threshold": 1}}
    (folder / "config.json").write_text(json.dumps(config))
    grid = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    save_file({"weights": grid}, str(folder / "model.safetensors"))
    est = ScoreEstimator.from_pretrained(folder)
    assert est.trained and est.model_id is None and est.metadata == {"support_threshold": 1}
    assert torch.equal(est.head_weights(), grid.float())
    (folder / "config.json").write_text(json.dumps({"num_layers": 2, "num_heads": 3, "metadata": None}))
    assert ScoreEstimator.from_pretrained(folder).metadata == {}


def test_save_refuses_what_load_would_refuse(tmp_path):
    """Symmetry the other way: a config that would not load back is never written."""
    est = ScoreEstimator(torch.rand(6), 2, 3, metadata={"support_threshold": "high"})
    with pytest.raises(EstimatorFormatError, match="metadata.support_threshold"):
        est.save_pretrained(tmp_path / "est")
    assert not list(tmp_path.iterdir())  # no half-written folder, no temp folder left behind
    good = ScoreEstimator(torch.rand(6), 2, 3).save_pretrained(tmp_path / "good")
    before = (good / "config.json").read_text()
    with pytest.raises(EstimatorFormatError, match="metadata.support_threshold"):
        est.update_card(good)
    assert (good / "config.json").read_text() == before


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_layers": 2.0}, "num_layers"),
        ({"num_layers": True, "num_heads": 6}, "num_layers"),  # was 1 x 6
        ({"num_heads": "3"}, "num_heads"),
        ({"trained": "false"}, "trained"),
        ({"model_id": 123}, "model_id"),
    ],
)
def test_constructor_refuses_values_that_would_not_save(kwargs, field):
    args = {"num_layers": 2, "num_heads": 3, **kwargs}
    with pytest.raises(EstimatorFormatError, match=field):
        ScoreEstimator(torch.rand(6), **args)


def test_constructor_accepts_numpy_integers():
    np = pytest.importorskip("numpy")
    est = ScoreEstimator(torch.rand(6), num_layers=np.int64(2), num_heads=np.int32(3))
    assert (type(est.num_layers), type(est.num_heads)) == (int, int)


def test_shipped_estimator_still_loads():
    est = ScoreEstimator.shipped("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert est is not None and est.trained
    assert (est.num_layers, est.num_heads) == (30, 9)
    assert est.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert math.isfinite(est.metadata["support_threshold"]) and torch.isfinite(est.weights).all()


# ---- the reference package's score_estimator.pt --------------------------------------------------------
def reference_payload(layers: int = 2, heads: int = 3) -> dict[str, Any]:
    """The layout the reference package torch-saves: plain dicts, strings, bools and tensors."""
    return {
        "class": "LinearScoreEstimator",
        "state_dict": collections.OrderedDict([("linear.weight", torch.rand(1, layers * heads))]),
        "feature_extractor": {
            "class": "AttentionFeatureExtractor",
            "kwargs": {"num_layers": layers, "num_heads": heads, "model_type": "llama"},
        },
        "kwargs": {"normalize": True, "non_negative": False, "bias": False},
        "extras": {"note": "written by the test"},
    }


def fe_kwargs(key: str, value: Any) -> Mutation:
    return lambda d: d["feature_extractor"]["kwargs"].__setitem__(key, value)


def state(key: str, value: Any) -> Mutation:
    return lambda d: d["state_dict"].__setitem__(key, value)


def with_bias(value: Any) -> Mutation:
    def mutate(d: dict[str, Any]) -> None:
        d["kwargs"]["bias"] = True
        d["state_dict"]["linear.bias"] = value
    return mutate


BAD_REFERENCE_FIELDS = [
    ("class-int", setter("class", 5), "'class'", "LinearScoreEstimator"),
    ("class-missing", dropper("class"), "'class'", "Field required"),
    ("feature_extractor-list", setter("feature_extractor", ["AttentionFeatureExtractor"]), "'feature_extractor'",
     "valid dictionary"),
    ("feature_extractor-null", setter("feature_extractor", None), "'feature_extractor'", "valid dictionary"),
    ("feature_extractor-kwargs-list", lambda d: d["feature_extractor"].__setitem__("kwargs", [2, 3]),
     "'feature_extractor.kwargs'", "valid dictionary"),
    ("num_layers-string", fe_kwargs("num_layers", "2"), "'feature_extractor.kwargs.num_layers'", "valid integer"),
    ("num_layers-float", fe_kwargs("num_layers", 2.0), "'feature_extractor.kwargs.num_layers'", "valid integer"),
    ("num_layers-bool", fe_kwargs("num_layers", True), "'feature_extractor.kwargs.num_layers'", "valid integer"),
    ("num_layers-zero", fe_kwargs("num_layers", 0), "'feature_extractor.kwargs.num_layers'", "greater than 0"),
    ("num_heads-fraction", fe_kwargs("num_heads", 3.5), "'feature_extractor.kwargs.num_heads'", "valid integer"),
    ("num_heads-negative", fe_kwargs("num_heads", -3), "'feature_extractor.kwargs.num_heads'", "greater than 0"),
    ("model_type-int", fe_kwargs("model_type", 5), "'feature_extractor.kwargs.model_type'", "valid string"),
    ("kwargs-list", setter("kwargs", [True]), "'kwargs'", "valid dictionary"),
    ("kwargs-string", setter("kwargs", "bias"), "'kwargs'", "valid dictionary"),
    ("bias-string", lambda d: d["kwargs"].__setitem__("bias", "yes"), "'kwargs.bias'", "valid boolean"),
    ("normalize-int", lambda d: d["kwargs"].__setitem__("normalize", 1), "'kwargs.normalize'", "valid boolean"),
    ("state_dict-list", setter("state_dict", [torch.rand(1, 6)]), "'state_dict'", "valid dictionary"),
    ("state_dict-null", setter("state_dict", None), "'state_dict'", "valid dictionary"),
    ("extras-list", setter("extras", ["note"]), "'extras'", "valid dictionary"),
    ("weight-list", state("linear.weight", [[0.1] * 6]), "'linear.weight'", "expected a tensor"),
    ("weight-int", state("linear.weight", torch.ones(1, 6, dtype=torch.int64)), "'linear.weight'", "floating point"),
    ("weight-complex", state("linear.weight", torch.ones(1, 6, dtype=torch.complex64)), "'linear.weight'",
     "floating point"),
    ("weight-nan", state("linear.weight", torch.full((1, 6), math.nan)), "'linear.weight'", "NaN or infinite"),
    ("weight-inf", state("linear.weight", torch.full((1, 6), math.inf)), "'linear.weight'", "NaN or infinite"),
    ("weight-1d", state("linear.weight", torch.rand(6)), "'linear.weight'", "shape [6], expected [1, 6]"),
    ("weight-grid", state("linear.weight", torch.rand(2, 3)), "'linear.weight'", "shape [2, 3], expected [1, 6]"),
    ("weight-wrong-size", state("linear.weight", torch.rand(1, 5)), "'linear.weight'", "num_layers x num_heads"),
    ("bias-empty", with_bias(torch.zeros(0)), "'linear.bias'", "shape [0], expected [1]"),
    ("bias-int", with_bias(torch.ones(1, dtype=torch.int64)), "'linear.bias'", "floating point"),
    ("bias-not-tensor", with_bias("0.5"), "'linear.bias'", "expected a tensor"),
    ("bias-nan", with_bias(torch.tensor([math.nan])), "'linear.bias'", "NaN or infinite"),
]


@pytest.mark.parametrize("mutate, field, problem", [c[1:] for c in BAD_REFERENCE_FIELDS],
                         ids=[c[0] for c in BAD_REFERENCE_FIELDS])
def test_bad_reference_field_is_refused_naming_file_and_field(tmp_path, mutate, field, problem):
    payload = reference_payload()
    mutate(payload)
    path = tmp_path / "score_estimator.pt"
    torch.save(payload, path)
    assert_refused(path, path, field, problem)


def test_reference_in_a_folder_is_checked_the_same_way(tmp_path):
    payload = reference_payload()
    payload["feature_extractor"]["kwargs"]["num_heads"] = "3"
    torch.save(payload, tmp_path / "score_estimator.pt")
    assert_refused(tmp_path, tmp_path / "score_estimator.pt", "'feature_extractor.kwargs.num_heads'")


def test_valid_reference_converts_and_round_trips(tmp_path):
    payload = reference_payload()
    payload["extras"].update({"steps": 3, "nested": {"x": 1}, 7: "int key"})
    path = tmp_path / "score_estimator.pt"
    torch.save(payload, path)
    est = load_reference_estimator(path, model_id="org/m", save_to=tmp_path / "converted")
    assert torch.equal(est.weights.detach(), payload["state_dict"]["linear.weight"].flatten())
    assert est.metadata["reference_extras"] == {"note": "written by the test", "steps": 3}
    assert est.metadata["reference_model_type"] == "llama"
    again = ScoreEstimator.from_pretrained(tmp_path / "converted")
    assert torch.equal(again.weights, est.weights) and again.metadata == est.metadata
    # optional parts may be missing: no kwargs, no extras, no model_type
    minimal = {"class": "LinearScoreEstimator", "state_dict": {"linear.weight": torch.rand(1, 6, dtype=torch.bfloat16)},
               "feature_extractor": {"class": "AttentionFeatureExtractor", "kwargs": {"num_layers": 2, "num_heads": 3}}}
    torch.save(minimal, path)
    est = ScoreEstimator.from_pretrained(path)
    assert est.metadata["reference_kwargs"] == {"normalize": None, "non_negative": None, "bias": None}


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_unreadable_reference_file_is_refused_naming_it(tmp_path, damage):
    """(Refused before too; kept as a guard.)"""
    path = tmp_path / "score_estimator.pt"
    torch.save(reference_payload(), path)
    data = path.read_bytes()
    path.write_bytes({"garbage": b"PK\x03\x04 not a zip", "truncated": data[: len(data) // 2], "empty": b""}[damage])
    assert_refused(path, path, "not a readable torch file")
