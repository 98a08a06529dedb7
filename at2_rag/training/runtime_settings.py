"""The runtime settings `at2-rag train` writes beside the weights: which collected examples fit which setting.

- `metadata["groundedness"]` (the head and score-sum calibration of `Citation.grounded`, estimated mode;
  at2_rag.training.groundedness): fitted on the training split of the single-turn sets and, by default, on every
  example of the multi-turn sets (`collect --sources context`), whose held-out evaluation is
  `at2-rag evaluate --conversations` on another file (`conversations="training-split"` fits on their training
  split only and measures their held-out split too); measured on the single-turn sets' held-out split.
- `metadata["refinement"]` (the prior of `ablations=k`; at2_rag.training.refinement): chosen on the training split
  of the sets collected over documents (`--sources documents`: the sources `ablations=k` removes in a single-turn
  request), else of every set.

The splits are the weights' own (`split_examples` with the same fraction and seed, each set on its own), so no
held-out example of the weights fits a setting. A setting that cannot be fitted from the data is left out of the
metadata (the runtime then falls back: the scores' scale for groundedness, the calibration's scale for the prior)
and the reason is returned, for `train` to print and record in the training report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..attribution.grounding import HEAD_RIDGE, HEAD_TARGET_CAP
from .data import CollectedExample
from .groundedness import fit_groundedness_settings
from .refinement import STRENGTHS, fit_refinement_prior
from .train import split_examples

logger = logging.getLogger(__name__)

CONVERSATION_CHOICES = ("all", "training-split")
FALLBACKS = {
    "groundedness": "estimated `grounded` falls back to the scores' scale (no head, no calibration)",
    "refinement": "`ablations=k` falls back to a prior of twice `score_to_log_odds` with the default strengths",
}


@dataclass
class RuntimeSettings:
    """`metadata` entries fitted (`groundedness`, `refinement`) and `notes`: per setting, why it was not fitted or
    what it left out (none when fitted in full)."""

    metadata: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, str]:
        """Per setting: "fitted", or what the runtime does instead and why (for the report and the console)."""
        out: dict[str, str] = {}
        for key in ("groundedness", "refinement"):
            note = self.notes.get(key)
            if key in self.metadata:
                out[key] = "fitted" + (f" ({note})" if note else "")
            else:
                out[key] = f"not fitted: {note}; {FALLBACKS[key]}"
        return out


def is_multi_turn(group: Sequence[CollectedExample]) -> bool:
    return bool(group) and all(ex.meta.get("sources") == "context" for ex in group)


def fit_runtime_settings(
    groups: Sequence[Sequence[CollectedExample]],
    weights: torch.Tensor,
    heldout_fraction: float = 0.15,
    seed: int = 0,
    conversations: str = "all",
    ridge: float = HEAD_RIDGE,
    cap: float = HEAD_TARGET_CAP,
    strengths: Sequence[float] = STRENGTHS,
    source: str = "at2-rag train",
) -> RuntimeSettings:
    """The groundedness and refinement settings of an estimator with `weights`, fitted on the collected sets
    `groups` (merged as `train` merges them) split as the weights were (`heldout_fraction`, `seed`)."""
    if conversations not in CONVERSATION_CHOICES:
        raise ValueError(f"conversations must be one of {CONVERSATION_CHOICES}, got {conversations!r}")
    out = RuntimeSettings()
    splits = [split_examples(group, heldout_fraction, seed) for group in groups]
    fit: list[CollectedExample] = []
    heldout: list[CollectedExample] = []
    for group, (train_part, held_part) in zip(groups, splits):
        if is_multi_turn(group) and conversations == "all":
            fit += list(group)
        else:
            fit += train_part
            heldout += held_part
    grounded = fit_groundedness_settings(
        fit, weights, heldout, ridge=ridge, cap=cap, source=source,
        multi_turn_examples="every example" if conversations == "all" else "training split",
    )
    if grounded.settings is not None:
        out.metadata["groundedness"] = grounded.settings
    if grounded.reason:
        out.notes["groundedness"] = grounded.reason

    documents = [part for group, (part, _) in zip(groups, splits)
                 if all(ex.meta.get("sources", "documents") == "documents" for ex in group)]
    examples = [ex for part in documents for ex in part]
    where = f"training split ({len(examples)} examples)"
    if not examples:
        examples = [ex for part, _ in splits for ex in part]
        where = f"training split of every set ({len(examples)} examples; none collected over documents alone)"
        out.notes["refinement"] = "no set was collected with --sources documents: chosen on every set's masks"
    prior, reason = fit_refinement_prior(examples, weights, strengths=strengths)
    if prior is not None:
        out.metadata["refinement"] = {**prior, "chosen_on": f"{where}, {source}"}
    else:
        out.notes["refinement"] = str(reason)
    for key, text in out.summary().items():
        if text != "fitted":
            logger.warning("%s %s", key, text)
    return out
