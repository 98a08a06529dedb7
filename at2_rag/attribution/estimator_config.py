"""An estimator folder's format: file names, the strict config.json schema and the checked readers of config.json
and model.safetensors.

Estimator folders are untrusted input (downloaded from the Hub, shared by others): config.json is validated with
strict pydantic models and the weight tensor's name, dtype, shape and values are checked, so a malformed file
fails with an EstimatorFormatError naming the file and the field instead of crashing or loading silently wrong.
"""

from __future__ import annotations

import json
import math
import operator
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open

from ..capture.features import FEATURE_VERSION
from ..errors import EstimatorFormatError
from ..storage.validation import describe_validation_error, describe_value

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
REFERENCE_NAME = "score_estimator.pt"
SHIPPED_PACKAGE = "at2_rag.estimators"
FORMAT_NAME: Literal["at2-rag-estimator"] = "at2-rag-estimator"
WEIGHTS_KEY = "weights"
# config.json holds a few numbers and an evaluation summary; anything near this size is not an estimator config
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# safetensors dtype names of the floating-point types a weight vector may be stored in (it is read as float32)
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


# ---- validating untrusted estimator files ---------------------------------------------------------------


def _support_threshold(value: float) -> float:
    # +inf is what training writes when no positive score-to-log-odds scale was found ("never supported"), so a
    # file save_pretrained wrote may hold it; NaN and -inf would make every comparison meaningless.
    if math.isnan(value) or value == -math.inf:
        raise ValueError("must be a finite number (or Infinity: nothing is ever supported)")
    return value


class _Strict(BaseModel):
    """Strict types throughout: "false" is not False, 9.5 is not 9, "3" is not 3."""

    model_config = ConfigDict(strict=True, protected_namespaces=(), frozen=True)


class EvaluationColumn(_Strict):
    """One column of the card's evaluation table, as the evaluation's metric registry described it."""

    model_config = ConfigDict(extra="allow")
    key: str
    label: str
    digits: int = Field(default=3, ge=0, le=12)


class EvaluationRecord(_Strict):
    """`metadata.evaluation` as `at2-rag evaluate --record` writes it; the model card renders its summary rows
    under its `columns` (records written before columns were kept: the LDS / top-k / passes table)."""

    model_config = ConfigDict(extra="allow")
    summary: dict[str, dict[str, Any]] = Field(default_factory=dict)
    columns: list[EvaluationColumn] | None = None


# the card's columns for evaluation records that do not list their own (written before metrics were pluggable)
LEGACY_EVALUATION_COLUMNS = (
    ("lds", "LDS", 3),
    ("lds_dependent", "LDS, document-dependent sentences", 3),
    ("top1_drop", "top-1 log-prob drop", 2),
    ("top3_drop", "top-3 log-prob drop", 2),
    ("extra_forward_passes", "extra forward passes", 1),
)


class EstimatorMetadata(_Strict):
    """The metadata keys at2-rag reads back (the attributor's support threshold, the card's evaluation table);
    every other key is free-form JSON kept as it was written."""

    model_config = ConfigDict(extra="allow")
    support_threshold: Annotated[float, AfterValidator(_support_threshold)] = 0.0
    evaluation: EvaluationRecord | None = None


class EstimatorConfig(_Strict):
    """config.json of an estimator folder, exactly as `ScoreEstimator.config_dict()` writes it.

    Unknown keys are refused rather than ignored: a misspelt `trainedd: false` must not load as trained.
    Free-form information belongs in `metadata`.
    """

    model_config = ConfigDict(extra="forbid")
    format: Literal["at2-rag-estimator"] = FORMAT_NAME
    model_id: str | None = None
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    feature_version: int = FEATURE_VERSION
    feature_definition: str | None = None
    trained: bool = True
    metadata: EstimatorMetadata | None = None


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # json.loads would silently keep the last one
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_config(data: bytes, where: str) -> tuple[EstimatorConfig, dict[str, Any]]:
    """Validate config.json bytes; returns the typed config and the metadata dict as written (order and all)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EstimatorFormatError(f"{where} is not UTF-8 text ({exc})") from exc
    try:
        raw = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, duplicate keys, over-long integers, nesting
        raise EstimatorFormatError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise EstimatorFormatError(f"{where} must hold a JSON object, found {describe_value(raw)}")
    try:
        config = EstimatorConfig.model_validate(raw)
    except ValidationError as exc:
        raise EstimatorFormatError(describe_validation_error(exc, where)) from exc
    if config.feature_version != FEATURE_VERSION:
        raise EstimatorFormatError(
            f"{where}: field 'feature_version': the estimator uses feature version {config.feature_version}, "
            f"this at2-rag computes version {FEATURE_VERSION}"
        )
    return config, dict(raw.get("metadata") or {})


def read_config(path: Path) -> tuple[EstimatorConfig, dict[str, Any]]:
    """Read and validate an estimator's config.json (size-capped: the file is untrusted)."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise EstimatorFormatError(f"{path} is {size} bytes, far too large for an estimator config")
        data = path.read_bytes()
    except OSError as exc:
        raise EstimatorFormatError(f"cannot read {path}: {exc}") from exc
    return parse_config(data, str(path))


def read_weights(path: Path, num_layers: int, num_heads: int) -> torch.Tensor:
    """The float32 weight vector from model.safetensors, checked (name, dtype, shape, finiteness) before use."""
    n = num_layers * num_heads
    try:
        with safe_open(str(path), framework="pt") as f:
            names = sorted(f.keys())
            if names != [WEIGHTS_KEY]:
                raise EstimatorFormatError(
                    f"{path}: expected exactly one tensor named {WEIGHTS_KEY!r}, found {names or 'none'}"
                )
            handle = f.get_slice(WEIGHTS_KEY)
            dtype, shape = handle.get_dtype(), list(handle.get_shape())
            if dtype not in FLOAT_DTYPES:
                raise EstimatorFormatError(
                    f"{path}: tensor {WEIGHTS_KEY!r} has dtype {dtype}, "
                    f"expected a float type ({', '.join(FLOAT_DTYPES)})"
                )
            if shape not in ([n], [num_layers, num_heads]):
                raise EstimatorFormatError(
                    f"{path}: tensor {WEIGHTS_KEY!r} has shape {shape}, expected [{n}] or [{num_layers}, {num_heads}] "
                    f"(num_layers x num_heads = {num_layers} x {num_heads} in {CONFIG_NAME})"
                )
            weights = f.get_tensor(WEIGHTS_KEY)
    except EstimatorFormatError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:  # garbage, truncated, unreadable
        raise EstimatorFormatError(f"{path} is not a readable safetensors file: {exc}") from exc
    weights = weights.to(torch.float32).flatten()
    if not torch.isfinite(weights).all():
        bad = int((~torch.isfinite(weights)).sum())
        raise EstimatorFormatError(f"{path}: tensor {WEIGHTS_KEY!r} has {bad} NaN or infinite values")
    return weights


def checked_index(value: Any, name: str) -> int:
    """An integer argument (numpy / torch integers too), never a float silently truncated or a bool."""
    if isinstance(value, bool):
        raise EstimatorFormatError(f"{name} must be an integer, got {describe_value(value)}")
    try:
        return operator.index(value)
    except TypeError as exc:
        raise EstimatorFormatError(f"{name} must be an integer, got {describe_value(value)}") from exc


def model_slug(model_id: str) -> str:
    """Folder name of a shipped estimator: the model id's last part, lower-cased."""
    return model_id.rstrip("/").split("/")[-1].lower()
