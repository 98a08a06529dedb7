"""Read estimators published for the reference `at2` package (`score_estimator.pt`) without running their code.

The file is a torch-saved dict of plain types and tensors. It is opened with `torch.load(weights_only=True)`
only; anything that would need to unpickle a class is refused. Its features are the same as ours: one per
query head, layer-major, mean over target tokens of the summed attention to each source.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from .errors import EstimatorFormatError
from .estimator import ScoreEstimator

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


def convert_reference(data: dict[str, Any], model_id: str | None = None, source: str = "") -> ScoreEstimator:
    """Turn the reference dict into a ScoreEstimator, checking every field it relies on."""
    where = f" in {source}" if source else ""
    if data.get("class") != REFERENCE_CLASS:
        raise EstimatorFormatError(f"expected class {REFERENCE_CLASS!r}{where}, found {data.get('class')!r}")
    extractor = data.get("feature_extractor") or {}
    if extractor.get("class") != REFERENCE_EXTRACTOR:
        raise EstimatorFormatError(
            f"expected feature extractor {REFERENCE_EXTRACTOR!r}{where}, found {extractor.get('class')!r}"
        )
    ex_kwargs = extractor.get("kwargs") or {}
    try:
        num_layers, num_heads = int(ex_kwargs["num_layers"]), int(ex_kwargs["num_heads"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EstimatorFormatError(f"feature_extractor kwargs lack num_layers/num_heads{where}") from exc
    kwargs = data.get("kwargs") or {}
    state = data.get("state_dict") or {}
    weight = state.get("linear.weight")
    if not isinstance(weight, torch.Tensor):
        raise EstimatorFormatError(f"state_dict has no tensor 'linear.weight'{where}")
    if weight.dim() != 2 or weight.shape[0] != 1:
        raise EstimatorFormatError(f"linear.weight{where} has shape {tuple(weight.shape)}, expected [1, L*H]")
    bias = state.get("linear.bias")
    if kwargs.get("bias") and isinstance(bias, torch.Tensor) and bias.abs().max() > 0:
        # A constant added to every source's score: it shifts scores but never changes their ranking.
        logger.warning("reference estimator%s has a bias (%s); at2-rag scores are bias-free", where, bias.tolist())
    metadata = {
        "converted_from": source or "reference at2 estimator",
        "reference_kwargs": {k: kwargs.get(k) for k in ("normalize", "non_negative", "bias")},
        "reference_model_type": ex_kwargs.get("model_type"),
        "reference_extras": {k: v for k, v in (data.get("extras") or {}).items() if isinstance(v, (str, int, float, bool))},
    }
    return ScoreEstimator(
        weight.detach().float().flatten(),
        num_layers,
        num_heads,
        model_id=model_id,
        trained=True,
        metadata=metadata,
    )


def load_reference_estimator(
    path: str | os.PathLike[str], model_id: str | None = None, save_to: str | os.PathLike[str] | None = None
) -> ScoreEstimator:
    """Load a reference `score_estimator.pt` (optionally saving it in at2-rag's safetensors form)."""
    estimator = convert_reference(read_reference_file(path), model_id=model_id, source=str(path))
    if save_to is not None:
        estimator.save_pretrained(save_to)
    return estimator
