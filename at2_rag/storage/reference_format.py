"""Read estimators published for the reference `at2` package (`score_estimator.pt`) without running their code.

The file is a torch-saved dict of plain types and tensors. It is opened with `torch.load(weights_only=True)`
only (torch's restricted unpickler: it rebuilds tensors and plain containers from a fixed allowlist and runs
no other code); anything that would need to unpickle a class is refused. The dict is untrusted too: every
field read from it is checked with strict pydantic models and tensor checks, and a malformed one is an
EstimatorFormatError naming the file and the field. Its features are the same as ours: one per query head,
layer-major, mean over target tokens of the summed attention to each source.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import EstimatorFormatError
from .validation import describe_validation_error, describe_value

logger = logging.getLogger(__name__)

REFERENCE_CLASS = "LinearScoreEstimator"
REFERENCE_EXTRACTOR = "AttentionFeatureExtractor"

# Reference repos on the Hugging Face Hub and the models they were trained for.
PUBLISHED_ESTIMATORS: dict[str, str] = {
    "madrylab/at2-phi-4-mini-instruct": "microsoft/Phi-4-mini-instruct",
    "madrylab/at2-llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "madrylab/at2-qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "madrylab/at2-gemma-3-4b-it": "google/gemma-3-4b-it",
}


def read_reference_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw dict, loaded with weights_only=True; a file needing custom classes is refused."""
    path = Path(path)
    if not path.is_file():
        raise EstimatorFormatError(f"{path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" not in str(exc).lower():  # no class to import: junk or a truncated file
            raise EstimatorFormatError(f"{path} is not a readable torch file: {exc}") from exc
        raise EstimatorFormatError(
            f"{path} needs arbitrary code to unpickle, which at2-rag refuses to run (weights_only=True): {exc}"
        ) from exc
    except Exception as exc:
        raise EstimatorFormatError(f"{path} is not a readable torch file: {exc}") from exc
    if not isinstance(data, dict):
        raise EstimatorFormatError(f"{path} holds a {type(data).__name__}, expected the reference estimator dict")
    return data


class _Reference(BaseModel):
    """Strict types (a "3" is not 3, 9.5 is not 9); keys at2-rag does not read are allowed: the format is not ours."""

    model_config = ConfigDict(strict=True, extra="allow", protected_namespaces=(), frozen=True)


class ReferenceExtractorKwargs(_Reference):
    """`AttentionFeatureExtractor(num_layers, num_heads, model_type=None)`'s arguments."""

    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    model_type: str | None = None


class ReferenceExtractor(_Reference):  # type: ignore[no-redef]  # pydantic's mypy plugin: alias 'kwargs' vs its **kwargs
    class_: Literal["AttentionFeatureExtractor"] = Field(alias="class")
    args: ReferenceExtractorKwargs = Field(validation_alias="kwargs")


class ReferenceEstimatorKwargs(_Reference):
    """`LinearScoreEstimator`'s switches; kept in the converted estimator's metadata, `bias` decides the warning."""

    normalize: bool | None = None
    non_negative: bool | None = None
    bias: bool | None = None


class ReferenceEstimatorFile(_Reference):  # type: ignore[no-redef]  # pydantic's mypy plugin: alias 'kwargs' vs its **kwargs
    """The dict the reference package torch-saves as score_estimator.pt (the fields at2-rag reads)."""

    class_: Literal["LinearScoreEstimator"] = Field(alias="class")
    feature_extractor: ReferenceExtractor
    state_dict: dict[str, Any]
    args: ReferenceEstimatorKwargs | None = Field(default=None, validation_alias="kwargs")
    extras: dict[Any, Any] | None = None  # informational: only its str -> scalar entries are kept


def _float_tensor(value: Any, name: str, where: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A dense floating-point tensor of exactly `shape` with finite values, as float32."""
    if value is None:
        raise EstimatorFormatError(f"{where}: state_dict has no tensor {name!r}")
    if not isinstance(value, torch.Tensor):
        raise EstimatorFormatError(f"{where}: state_dict[{name!r}] is {describe_value(value)}, expected a tensor")
    if value.layout != torch.strided or not value.is_floating_point():
        raise EstimatorFormatError(
            f"{where}: state_dict[{name!r}] is a {value.layout} {value.dtype} tensor, expected dense floating point"
        )
    if tuple(value.shape) != shape:
        raise EstimatorFormatError(
            f"{where}: state_dict[{name!r}] has shape {list(value.shape)}, expected {list(shape)}"
            + (" ([1, L*H], num_layers x num_heads from feature_extractor.kwargs)" if name == "linear.weight" else "")
        )
    out = value.detach().to(torch.float32)
    if not torch.isfinite(out).all():
        raise EstimatorFormatError(f"{where}: state_dict[{name!r}] has NaN or infinite values")
    return out


@dataclass(frozen=True)
class ReferenceEstimator:
    """The checked contents of a reference estimator: what `ScoreEstimator.from_reference_weights` is built from.

    Plain data, so this module needs nothing from `at2_rag.attribution.estimator` (which imports this one)."""

    weights: torch.Tensor  # [num_layers * num_heads] float32, layer-major
    num_layers: int
    num_heads: int
    model_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def convert_reference(data: dict[str, Any], model_id: str | None = None, source: str = "") -> ReferenceEstimator:
    """Check the reference dict's every field the conversion relies on (the file is untrusted)."""
    where = source or "reference estimator"
    if not isinstance(data, dict):
        raise EstimatorFormatError(f"{where} holds {describe_value(data)}, expected the reference estimator dict")
    try:
        ref = ReferenceEstimatorFile.model_validate(data)
    except ValidationError as exc:
        raise EstimatorFormatError(describe_validation_error(exc, where)) from exc
    num_layers, num_heads = ref.feature_extractor.args.num_layers, ref.feature_extractor.args.num_heads
    n = num_layers * num_heads
    weight = data["state_dict"].get("linear.weight")
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == 1 and weight.shape[1] != n:
        raise EstimatorFormatError(
            f"{where}: state_dict['linear.weight'] has {weight.shape[1]} weights but num_layers x num_heads = "
            f"{num_layers} x {num_heads} = {n} (feature_extractor.kwargs)"
        )
    weight = _float_tensor(weight, "linear.weight", where, (1, n))
    kwargs = ref.args or ReferenceEstimatorKwargs()
    if "linear.bias" in data["state_dict"]:
        bias = _float_tensor(data["state_dict"]["linear.bias"], "linear.bias", where, (1,))
        if kwargs.bias and bias.abs().max() > 0:
            # A constant added to every source's score: it shifts scores but never changes their ranking.
            logger.warning(
                "reference estimator in %s has a bias (%s); at2-rag scores are bias-free", where, bias.tolist()
            )
    extras = ref.extras or {}
    metadata = {
        "converted_from": source or "reference at2 estimator",
        "reference_kwargs": {k: getattr(kwargs, k) for k in ("normalize", "non_negative", "bias")},
        "reference_model_type": ref.feature_extractor.args.model_type,
        "reference_extras": {
            k: v for k, v in extras.items() if isinstance(k, str) and isinstance(v, (str, int, float, bool))
        },
    }
    return ReferenceEstimator(weight.flatten(), num_layers, num_heads, model_id=model_id, metadata=metadata)


def read_reference_estimator(path: str | os.PathLike[str], model_id: str | None = None) -> ReferenceEstimator:
    """Read and check a reference `score_estimator.pt`; `ScoreEstimator.from_reference` turns it into an estimator."""
    return convert_reference(read_reference_file(path), model_id=model_id, source=str(path))
