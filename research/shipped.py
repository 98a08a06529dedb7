"""Record a study's settings into the shipped SmolLM2 estimator (config.json and its model card)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from at2_rag.attribution.estimator import ScoreEstimator, model_slug

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
FOLDER = Path(__file__).resolve().parents[1] / "at2_rag" / "estimators" / model_slug(MODEL)


def record_metadata(key: str, value: dict[str, Any]) -> Path:
    """`metadata[key] = value`, written by `update_card` (validated, atomic; the card shows it)."""
    estimator = ScoreEstimator.from_folder(FOLDER)
    estimator.metadata[key] = value
    estimator.update_card(FOLDER)
    ScoreEstimator.from_folder(FOLDER)  # what was written loads back
    return FOLDER / "config.json"
