"""An evaluation report on disk: written atomically, parts merged (examples evaluated in several processes), and
recorded into the estimator's folder (config metadata and model card)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..attribution.estimator import ScoreEstimator
from ..errors import InputFileError
from ..storage.files import read_user_text
from .report import report_columns_of, summarize

logger = logging.getLogger(__name__)


def _read_part(path: Path) -> dict[str, Any]:
    """One part report written by `evaluate --part`; anything else is an `InputFileError` naming the file."""
    text = read_user_text(path, "JSON report of `evaluate --part`")
    try:
        part = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputFileError(
            f"{path}:{exc.lineno} is not valid JSON: {exc.msg} (column {exc.colno})", path, exc.lineno
        ) from exc
    if not isinstance(part, dict) or not isinstance(part.get("examples"), list):
        raise InputFileError(f"{path} is not a report of `evaluate --part` (no list of 'examples')", path)
    return part


# what every part of one evaluation shares (a part without a field, written before it was recorded, reads None)
MERGE_MUST_AGREE = ("model_id", "estimator", "seed", "max_new_tokens", "lds_masks", "budgets")


def merge_reports(paths: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """One report from the parts written by several evaluation processes."""
    parts = [_read_part(Path(p)) for p in paths]
    names = {tuple(part.get("metrics") or ()) for part in parts}
    if len(names) > 1:
        raise InputFileError(f"the parts were evaluated with different metrics: {sorted(names)}")
    for key in MERGE_MUST_AGREE:  # parts of one evaluation, not two evaluations averaged into one summary
        values = {json.dumps(part.get(key), sort_keys=True) for part in parts}
        if len(values) > 1:
            raise InputFileError(f"the parts were evaluated with different {key}: {', '.join(sorted(values))}")
    seen: dict[str, str] = {}
    for path, part in zip(paths, parts, strict=True):
        for row in part["examples"]:
            example = str(row.get("id")) if isinstance(row, dict) else repr(row)
            if example in seen:
                raise InputFileError(f"example {example} is in two parts ({seen[example]} and {path}): a part given "
                                     "twice, or parts of different splits")
            seen[example] = str(path)
    rows = [row for part in parts for row in part["examples"]]
    summary = summarize(rows, report_columns_of(parts[0]))
    return {**parts[0], "num_examples": len(rows), "summary": summary, "examples": rows}


def evaluation_record(report: dict[str, Any], examples: str) -> dict[str, Any]:
    """What an estimator's metadata keeps of a report: the summary and the columns its model card shows."""
    return {
        "examples": examples,
        "num_examples": report["num_examples"],
        "lds_masks": report.get("lds_masks"),
        "columns": [c.to_dict() for c in report_columns_of(report) if c.card],
        "summary": report["summary"],
    }


def record_evaluation(folder: str | os.PathLike[str], report: dict[str, Any], examples: str) -> None:
    """Keep an evaluation summary in the estimator's config and model card (what a Hub page shows)."""
    estimator = ScoreEstimator.from_folder(folder)
    estimator.metadata["evaluation"] = evaluation_record(report, examples)
    estimator.update_card(folder)
