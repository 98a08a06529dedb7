"""The model card (README.md) of a saved estimator: Hub metadata, training facts, the evaluation table and the
runtime settings (refinement prior, groundedness calibration) the card records."""

from __future__ import annotations

from typing import Any

from ..capture.features import FEATURE_DEFINITION, FEATURE_VERSION
from .estimator_config import LEGACY_EVALUATION_COLUMNS


def estimator_card(estimator: Any) -> str:
    """The estimator's model card: what it is, how it was trained, its evaluation and its runtime settings."""
    meta = estimator.metadata
    lines = [
        "---",
        "library_name: at2-rag",
        "tags: [attribution, rag, at2]",
        *([f"base_model: {estimator.model_id}"] if estimator.model_id else []),
        "---",
        f"# AT2 score estimator{f' for {estimator.model_id}' if estimator.model_id else ''}",
        "",
        "A linear estimator over attention-head features (AT2, Cohen-Wang et al. 2025) that predicts the effect "
        "of removing each retrieved document on the model's answer. Load it with "
        "`at2_rag.ScoreEstimator.from_pretrained(...)`.",
        "",
        f"- Layers x heads: {estimator.num_layers} x {estimator.num_heads}",
        f"- Trained: {estimator.trained}",
        f"- Feature definition (v{FEATURE_VERSION}): {FEATURE_DEFINITION}",
    ]
    for key in ("training_data", "num_examples", "epochs", "heldout_correlation"):
        if meta.get(key) is not None:  # None: trained without held-out examples
            lines.append(f"- {key.replace('_', ' ').capitalize()}: {meta[key]}")
    evaluation = meta.get("evaluation")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("summary"), dict):
        lines += ["", *evaluation_table(evaluation)]
    lines += _settings_lines(meta)
    return "\n".join(lines) + "\n"


def _settings_lines(meta: dict[str, Any]) -> list[str]:
    """Card sections for the refinement prior, the groundedness calibration and the conversation evaluation."""
    lines: list[str] = []
    refinement = meta.get("refinement")
    if isinstance(refinement, dict):
        lines += ["", "## Refinement with `ablations=k`", ""]
        lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in refinement.items()]
    groundedness = meta.get("groundedness")
    if isinstance(groundedness, dict):
        lines += ["", "## Groundedness (`Citation.grounded`, nats)", ""]
        lines += [f"- {k.replace('_', ' ')}: {_card_value(v)}" for k, v in groundedness.items()]
    evaluated = meta.get("groundedness_evaluation")
    if isinstance(evaluated, dict) and evaluated:
        lines += ["", "## Groundedness evaluated (`at2-rag evaluate --groundedness`)", ""]
        lines += [
            "`grounded` against the label (the sentence's log-probability drops by >= 1 nat with every document "
            "masked out), per held-out set; standard errors from a bootstrap over examples. Measured is exact by "
            "construction; estimated is the zero-pass head above.",
            "",
            "| examples | sentences | measured AUROC | estimated AUROC | estimated precision | estimated recall |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in evaluated.items():
            if isinstance(row, dict):
                cells = [_card_value(row.get(key)) for key in (
                    "measured_auroc", "estimated_auroc", "estimated_supported_precision", "estimated_supported_recall"
                )]
                lines.append(f"| {name} | {row.get('sentences')} | " + " | ".join(cells) + " |")
    conversations = meta.get("conversations")
    if isinstance(conversations, dict):
        lines += ["", "## Conversations (multi-turn held-out examples)", ""]
        lines += [
            f"- {k.replace('_', ' ')}: {_card_value(v)}"
            for k, v in conversations.items()
            if not isinstance(v, dict) or "mean" in v
        ]
    return lines


def _card_value(value: Any) -> str:
    """A metadata value as the model card shows it: a measurement as mean ± se, a weight list by its length."""
    if isinstance(value, list):
        return f"{len(value)} per-head weights"
    if isinstance(value, dict) and isinstance(value.get("mean"), (int, float)):
        se = value.get("se")
        se_text = f" ± {se:.3f}" if isinstance(se, (int, float)) and se == se else ""
        return f"{value['mean']:.3f}{se_text}"
    return str(value)


def evaluation_table(evaluation: dict[str, Any]) -> list[str]:
    """Markdown lines for an `at2-rag evaluate` summary recorded in an estimator's metadata."""
    summary = evaluation["summary"]

    def number(row: dict[str, Any], key: str, digits: int) -> str:
        value = row.get(key)
        if not isinstance(value, (int, float)) or value != value:  # missing or NaN
            return "n/a"
        sem = row.get(key + "_sem")
        spread = f" ± {sem:.{digits}f}" if isinstance(sem, (int, float)) and sem == sem else ""
        return f"{value:.{digits}f}{spread}"

    recorded = evaluation.get("columns")
    table = [
        (c["key"], str(c.get("label", c["key"])), min(max(c.get("digits", 3), 0), 12))
        for c in (recorded if isinstance(recorded, list) else [])
        if isinstance(c, dict) and isinstance(c.get("key"), str) and type(c.get("digits", 3)) is int
    ] or list(LEGACY_EVALUATION_COLUMNS)
    lines = [
        f"## Evaluation ({evaluation.get('num_examples', '?')} held-out examples"
        + (f", {evaluation['examples']}" if evaluation.get("examples") else "") + ")",
        "",
        "| method | " + " | ".join(label for _, label, _ in table) + " |",
        "|---|" + "---:|" * len(table),
    ]
    for name, row in summary.items():
        if not isinstance(row, dict):  # not a method's row (a hand-edited record): nothing to show
            continue
        lines.append(f"| {name} | " + " | ".join(number(row, key, digits) for key, _, digits in table) + " |")
    return lines
