"""Evaluate groundedness: does `grounded` tell which answer sentences depend on the documents?

For every held-out example the model answers (greedy), then every answer sentence gets:
- its `grounded` in each mode: "measured" (the documents-free pass, exact by construction) and "estimated" (the
  estimator's zero-pass head, what `groundedness="estimated"` returns);
- the label, from an independent masked forward pass over the whole sequence (the ablations' convention, not the
  measured pass's code path): the sentence's log-probability drops by >= 1 nat when every document is masked out.

Reported per mode: AUROC of `grounded` against the label, precision and recall of `supported`, with standard
errors from a bootstrap over examples (sentences of one answer are not independent). Examples marked
`"mismatched": true` (a question asked over another question's documents) are also reported apart.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..attribution.grounding import auroc
from ..attributor import Attributor
from ..capture.masked import ablation_attention_mask, answer_logit_probs, target_log_prob
from ..examples import Example, example_digest
from ..prompting.answer import answer_targets
from ..storage.files import atomic_path
from .conversations import estimator_digest, read_row_entries
from .metrics import bootstrap_se

logger = logging.getLogger(__name__)

MODES = ("measured", "estimated")
LABEL_NATS = 1.0  # the project's definition of "depends on the documents"
BOOTSTRAP_REPS = 1000


def example_rows(
    attributor: Attributor, example: Example, max_new_tokens: int, mismatched: bool = False
) -> list[dict[str, Any]]:
    """One row per answer sentence of the example: both modes' `grounded` and `supported`, and the label."""
    request = {"query": example.query, "documents": example.documents, "history": example.history or None}
    run = attributor.run(attributor.prepare(request, max_new_tokens=max_new_tokens))
    results = {mode: attributor.score(run, attributor.gather_evidence(run, mode), mode) for mode in MODES}  # type: ignore[arg-type]
    ids = run.prompt.input_ids + run.answer.token_ids
    spans = run.prompt.doc_token_spans
    keep = torch.tensor([[True] * len(spans), [False] * len(spans)])
    with attributor.lock:
        logit_probs = answer_logit_probs(
            attributor.model, ids, len(run.answer.token_ids), ablation_attention_mask(len(ids), spans, keep)
        )
    rows = []
    for k, (span, token_rows) in enumerate(answer_targets(run.answer)):
        log_p = target_log_prob(logit_probs, token_rows)
        drop = float(log_p[0] - log_p[1])
        row: dict[str, Any] = {
            "id": example.id,
            "mismatched": mismatched,
            "sentence": run.answer.text[span.start : span.end],
            "log_prob_drop": drop,
            "depends_on_documents": drop >= LABEL_NATS,
        }
        for mode, result in results.items():
            citation = result.citations[k]
            row[f"{mode}_grounded"] = citation.grounded
            row[f"{mode}_supported"] = citation.supported
        rows.append(row)
    return rows


def _bootstrap(statistic: Any, groups: list[list[int]], reps: int = BOOTSTRAP_REPS) -> float:
    """Standard error of `statistic(row indices)` over resamples of whole examples (`groups`: each example's row
    indices): `bootstrap_se` over the examples, each resampled example standing for all its rows."""
    return bootstrap_se(lambda picked: statistic([i for g in picked.tolist() for i in groups[g]]), len(groups), reps)


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """AUROC and `supported` precision / recall per mode, with bootstrap-over-examples standard errors."""
    if not rows:
        return {"sentences": 0}
    order: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        order.setdefault(row["id"], []).append(i)
    groups = list(order.values())
    labels = torch.tensor([bool(r["depends_on_documents"]) for r in rows])

    def ratio(numerator: torch.Tensor, denominator: torch.Tensor, idx: list[int]) -> float:
        d = denominator[idx]
        return float(numerator[idx][d].double().mean()) if bool(d.any()) else float("nan")

    summary: dict[str, Any] = {
        "examples": len(groups),
        "sentences": len(rows),
        "depends_on_documents": float(labels.double().mean()),
        "label": f"the sentence's log-probability drops by >= {LABEL_NATS:g} nat with every document masked out "
        "(an independent full masked pass)",
    }
    for mode in MODES:
        scores = torch.tensor([float(r[f"{mode}_grounded"]) for r in rows], dtype=torch.double)
        supported = torch.tensor([bool(r[f"{mode}_supported"]) for r in rows])
        all_rows = list(range(len(rows)))
        summary[mode] = {
            "auroc": {
                "mean": auroc(scores, labels),
                "se": _bootstrap(lambda idx, s=scores: auroc(s[idx], labels[idx]), groups),
            },
            "supported_precision": {
                "mean": ratio(labels, supported, all_rows),
                "se": _bootstrap(lambda idx, s=supported: ratio(labels, s, idx), groups),
            },
            "supported_recall": {
                "mean": ratio(supported, labels, all_rows),
                "se": _bootstrap(lambda idx, s=supported: ratio(s, labels, idx), groups),
            },
        }
    return summary


def evaluate_groundedness(
    attributor: Attributor,
    examples: Sequence[Example],
    output: str | os.PathLike[str],
    max_new_tokens: int = 64,
    mismatched: Collection[str] = (),
) -> dict[str, Any]:
    """Evaluate both modes on `examples`; each example's rows go to OUTPUT.jsonl as one line (resumable: an example
    already there with the same content, model, estimator and answer length is not run again), the summary (all
    examples; matched and mismatched apart when some example ids are `mismatched`) to OUTPUT."""
    output = Path(output)
    rows_path = output.with_suffix(".jsonl")
    key = {
        "model": str(attributor.model_id or ""),
        "max_new_tokens": max_new_tokens,
        "estimator": estimator_digest(attributor.estimator, attributor.scorer.groundedness(refined=False)),
    }
    wanted = {e.id: example_digest(e) for e in examples}
    done = {
        entry["example"]: entry["rows"]
        for entry in read_row_entries(rows_path, "groundedness")
        if entry.get("key") == key and wanted.get(entry["example"]) == entry.get("digest")
    }
    with rows_path.open("a") as f:
        for example in tqdm([e for e in examples if e.id not in done], desc="groundedness"):
            rows = example_rows(attributor, example, max_new_tokens, example.id in mismatched)
            if not rows:
                logger.warning("example %s: empty answer, no sentence to evaluate", example.id)
            entry = {"example": example.id, "digest": wanted[example.id], "key": key, "rows": rows}
            f.write(json.dumps(entry) + "\n")
            f.flush()
            done[example.id] = rows
    rows = [row for e in examples for row in done[e.id]]
    summary: dict[str, Any] = {"all": summarize(rows), "max_new_tokens": max_new_tokens}
    if any(r["mismatched"] for r in rows):
        summary["matched"] = summarize([r for r in rows if not r["mismatched"]])
        summary["mismatched"] = summarize([r for r in rows if r["mismatched"]])
    with atomic_path(output) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary


def groundedness_record(summary: dict[str, Any], examples: str) -> dict[str, dict[str, Any]]:
    """The rows an estimator's card keeps of a groundedness evaluation: one per set (all examples, and matched /
    mismatched apart when the file marks them), each mode's AUROC and `supported` precision / recall."""
    records = {}
    for part in ("all", "matched", "mismatched"):
        if part not in summary or not summary[part].get("sentences"):
            continue
        name = examples if part == "all" else f"{examples} ({part})"
        row: dict[str, Any] = {"sentences": summary[part]["sentences"], "examples": summary[part]["examples"]}
        for mode in MODES:
            for key, value in summary[part][mode].items():
                row[f"{mode}_{key}"] = value
        records[name] = row
    return records


def record_groundedness(folder: str | os.PathLike[str], summary: dict[str, Any], examples: str) -> None:
    """Keep a groundedness evaluation in the estimator's config and model card, beside the other sets' (other
    metadata untouched)."""
    from ..attribution.estimator import ScoreEstimator

    estimator = ScoreEstimator.from_folder(folder)
    previous = estimator.metadata.get("groundedness_evaluation")
    kept = {k: v for k, v in previous.items() if not k.startswith(examples)} if isinstance(previous, dict) else {}
    estimator.metadata["groundedness_evaluation"] = {**kept, **groundedness_record(summary, examples)}
    estimator.update_card(folder)


def mismatched_ids(path: str | os.PathLike[str]) -> set[str]:
    """Ids of the examples a JSONL file marks `"mismatched": true` (asked over another question's documents)."""
    ids = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            if isinstance(record, dict) and record.get("mismatched") is True:
                ids.add(str(record.get("id")))
    return ids
