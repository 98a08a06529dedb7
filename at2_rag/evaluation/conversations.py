"""Evaluate attribution in conversations: earlier turns, the system prompt and the question are sources too.

Multi-turn examples are built from single-turn RAG examples: the model answers the first question from the
documents (its own earlier answer becomes the history), then a follow-up that repeats, builds on or doubts the
earlier answer, or asks something the documents cannot answer. For every sentence of the follow-up answer:

- top-1 agreement with leave-one-out over documents + context sources (each removed alone, one pass each);
- `grounded` against the label "removing every document lowers the sentence's log-probability by >= 1 nat"
  (one pass with every document removed): AUROC, and precision / recall of `supported`.

Baselines: average attention (uniform head weights) on the same sources, the document-only view (the best
document, which can never point at an earlier turn), and any other estimators passed as `baselines` (top-1
agreement on the same runs and passes). Standard errors: over targets (bootstrap for AUROC).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..attribution.estimator import ScoreEstimator
from ..attribution.grounding import GroundednessCalibration, auroc
from ..attributor import Attributor
from ..capture.features import target_features
from ..capture.masked import ablated_answer_logit_probs, target_log_odds, target_log_prob
from ..errors import InputFileError, InvalidInputError
from ..evidence.layout import history_columns
from ..examples import Example, example_digest
from ..prompting.answer import answer_targets
from ..storage.files import atomic_path
from .metrics import bootstrap_se, mean_se

logger = logging.getLogger(__name__)

FOLLOW_UPS = {
    "repeat": "Can you repeat your previous answer?",
    "build_on": "Can you explain that in more detail?",
    "doubt": "Are you sure? I read the opposite somewhere.",
}
KINDS = ("repeat", "build_on", "doubt", "unanswerable")


def follow_up(examples: Sequence[Example], i: int) -> tuple[str, str]:
    """Conversation i's follow-up: its kind, `KINDS[i % 4]`, and its question (the unanswerable one is the question
    of the example half the list away, whose documents are not given). Depends on the whole list, so evaluate
    the whole held-out file and limit the examples evaluated, not the list."""
    kind = KINDS[i % len(KINDS)]
    return kind, FOLLOW_UPS.get(kind) or examples[(i + len(examples) // 2) % len(examples)].query


def conversation_example(
    attributor: Attributor, examples: Sequence[Example], i: int, first_turn_tokens: int = 48
) -> dict[str, Any]:
    """Multi-turn example i: the model's own answer to `examples[i]` as history, then `follow_up(examples, i)`."""
    example = examples[i]
    first = attributor.generate(example.query, example.documents, max_new_tokens=first_turn_tokens)
    kind, follow_up_question = follow_up(examples, i)
    return {
        "id": f"{example.id}-{kind}",
        "kind": kind,
        "query": follow_up_question,
        "documents": example.documents,
        "history": [{"role": "user", "content": example.query}, {"role": "assistant", "content": first.answer}],
    }


def evaluate_conversation(
    attributor: Attributor,
    example: dict[str, Any],
    max_new_tokens: int = 48,
    batch_size: int = 8,
    baselines: Mapping[str, ScoreEstimator] | None = None,
) -> list[dict[str, Any]]:
    """One row per sentence of the follow-up answer (see the module docstring). `baselines`: other estimators
    (an earlier one, say) whose best source is recorded too, on the same run and the same passes."""
    request = {"query": example["query"], "documents": example["documents"], "history": example["history"]}
    run = attributor.run(attributor.prepare(request, max_new_tokens=max_new_tokens))
    prompt, answer = run.prompt, run.answer
    targets = answer_targets(answer)
    n_docs, n_sents, n_ctx = len(prompt.doc_sources), len(prompt.sentence_sources), len(prompt.context_parts)
    spans = prompt.doc_token_spans + prompt.context_token_spans
    if not targets or not n_docs:
        return []
    n = len(spans)
    masks = torch.ones(n + 2, n, dtype=torch.bool)  # row 0 everything; 1..n one source removed; last: no documents
    for s in range(n):
        masks[1 + s, s] = False
    masks[-1, :n_docs] = False
    with attributor.lock:
        logit_probs = ablated_answer_logit_probs(
            attributor.model, prompt.input_ids + answer.token_ids, len(answer.token_ids), spans, masks, batch_size
        )
    grounding = attributor.scorer.groundedness(refined=False)
    uniform = torch.full_like(attributor.estimator.weights.detach(), 1.0 / attributor.estimator.weights.numel())
    keys = [f"doc:{d.id}" for d in prompt.documents] + [p.key for p in prompt.context_parts]
    chosen_turns = [n_docs + j for j, p in enumerate(prompt.context_parts) if p.kind == "history"]  # of `chosen`
    turn_columns = history_columns(prompt)  # the same turns among all of `features`' columns
    rows = []
    for span, token_rows in targets:
        features = target_features(run.token_features, token_rows)  # [docs + sentences + context, LH]
        chosen = torch.cat([features[:n_docs], features[n_docs + n_sents : n_docs + n_sents + n_ctx]])
        at2 = chosen @ attributor.estimator.weights.detach()
        average = chosen @ uniform
        log_odds = target_log_odds(logit_probs, token_rows)
        log_p = target_log_prob(logit_probs, token_rows)
        loo = log_odds[0] - log_odds[1 : n + 1]
        drop = float(log_p[0] - log_p[-1])
        history_features = features[turn_columns].sum(0)
        grounded = grounding.grounded(
            at2[:n_docs].tolist(), at2[chosen_turns].tolist(), features[:n_docs].sum(0), history_features
        )
        rows.append(
            {
                "id": example["id"],
                "kind": example["kind"],
                "sentence": answer.text[span.start : span.end],
                "loo_top": keys[int(loo.argmax())],
                "at2_top": keys[int(at2.argmax())],
                "average_top": keys[int(average.argmax())],
                "baseline_tops": {
                    name: keys[int((chosen @ est.weights.detach()).argmax())] for name, est in (baselines or {}).items()
                },
                "documents_only_top": keys[int(at2[:n_docs].argmax())],
                "grounded": grounded,
                "sum_grounded": grounding.grounded(at2[:n_docs].tolist(), at2[chosen_turns].tolist()),
                "document_score_sum": float(at2[:n_docs].sum()),
                "history_score_sum": float(at2[chosen_turns].sum()),
                "average_grounded": float(average[:n_docs].sum()),
                "no_documents_log_prob_drop": drop,
                "depends_on_documents": drop >= 1.0,
                "supported": grounded >= grounding.threshold,
                # per source, for analyses that need more than the tops
                "sources": keys,
                "at2_scores": at2.tolist(),
                "leave_one_out": loo.tolist(),
            }
        )
    return rows


NEAR_TIE_NATS = 0.5  # leave-one-out effects closer than this are a near-tie: which one is "top" is a coin flip


def near_tie_agreement(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How much of the strict top-1 disagreement is near-ties: the share of targets whose two largest
    leave-one-out effects lie within `NEAR_TIE_NATS`, top-1 agreement on the other (clear) targets, and the share
    of targets whose best-scored source's effect is within `NEAR_TIE_NATS` of the largest. Rows from before the
    per-source scores and effects were kept are left out (`n` counts the rest; none left: no entries)."""
    rows = [r for r in rows if len(r.get("leave_one_out") or ()) >= 2 and r.get("at2_scores")]
    if not rows:
        return {}
    ties, clear, near = [], [], []
    for r in rows:
        effects, scores = r["leave_one_out"], r["at2_scores"]
        first, second = sorted(effects, reverse=True)[:2]
        ties.append(first - second < NEAR_TIE_NATS)
        if not ties[-1]:
            clear.append(r["at2_top"] == r["loo_top"])
        near.append(first - effects[max(range(len(scores)), key=scores.__getitem__)] < NEAR_TIE_NATS)
    return {"leave_one_out_near_ties": mean_se(ties), "top1_agreement_at2_clear_targets": mean_se(clear),
            "top1_within_near_tie_of_leave_one_out": mean_se(near)}


def summarize_conversations(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Metrics with standard errors over targets (AUROC: bootstrap)."""
    summary: dict[str, Any] = {"targets": len(rows), "examples": len({r["id"] for r in rows})}
    for method in ("at2", "average", "documents_only"):
        summary[f"top1_agreement_{method}"] = mean_se([r[f"{method}_top"] == r["loo_top"] for r in rows])
    summary.update(near_tie_agreement(rows))
    names = set.intersection(*(set(r.get("baseline_tops", {})) for r in rows)) if rows else set()
    partial = {name for r in rows for name in r.get("baseline_tops", {})} - names
    if partial:  # rows measured before a baseline was added: comparing on part of the rows would mislead
        logger.warning("baselines %s are missing from some rows (measured before them): not summarized; delete "
                       "the rows file to measure every example with them", sorted(partial))
    for name in sorted(names):
        summary.setdefault("top1_agreement_baselines", {})[name] = mean_se(
            [r["baseline_tops"][name] == r["loo_top"] for r in rows]
        )
    summary["loo_top_is_query"] = mean_se([r["loo_top"] == "query" for r in rows])["mean"]
    labels = torch.tensor([r["depends_on_documents"] for r in rows])
    methods = (
        ("at2", "grounded"),  # the estimator's calibration: its learned head when it has one
        ("at2_score_sum", "sum_grounded"),  # the estimator's scores through the sum calibration
        ("documents_only", "document_score_sum"),  # the document scores' sum alone
        ("average", "average_grounded"),
    )

    def auroc_with_se(scores: torch.Tensor) -> dict[str, float]:
        return {"mean": auroc(scores, labels), "se": bootstrap_se(lambda i: auroc(scores[i], labels[i]), len(scores))}

    for method, key in methods:
        summary[f"groundedness_auroc_{method}"] = auroc_with_se(
            torch.tensor([r[key] for r in rows], dtype=torch.double)
        )
    supported = torch.tensor([r["supported"] for r in rows])
    summary["supported_precision"] = mean_se([bool(x) for x in labels[supported].tolist()])
    summary["supported_recall"] = mean_se([bool(x) for x in supported[labels].tolist()])
    summary["depends_on_documents"] = mean_se([bool(x) for x in labels.tolist()])
    summary["loo_top_is_context"] = mean_se([not r["loo_top"].startswith("doc:") for r in rows])
    summary["by_kind"] = {
        kind: {
            "targets": sum(r["kind"] == kind for r in rows),
            "top1_agreement_at2": mean_se([r["at2_top"] == r["loo_top"] for r in rows if r["kind"] == kind])["mean"],
        }
        for kind in KINDS
    }
    return summary


def read_row_entries(path: Path, what: str = "conversation") -> list[dict[str, Any]]:
    """A rows file's finished `{example, rows}` entries (one line per example, so an example is recorded whole or
    not at all). A last line cut short by a killed run is dropped from the file (its example is measured again);
    any other unreadable line is an error naming it, never silently skipped."""
    if not path.exists():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        cut = text.rfind("\n") + 1
        logger.warning("%s: dropping an unfinished last line (a killed run); that example is measured again", path)
        text = text[:cut]
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("rows"), list) or "example" not in entry:
                raise ValueError("not an {example, rows} object")
        except ValueError as exc:
            raise InputFileError(f"{path} line {number} is not a {what} row entry ({exc}); delete the line "
                                 "or the file to measure its example again") from exc
        entries.append(entry)
    return entries


def evaluate_conversations(
    attributor: Attributor,
    examples: Sequence[Example],
    rows_path: str | os.PathLike[str],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    baselines: Mapping[str, ScoreEstimator] | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """The first `limit` examples (default: all) as conversations (`conversation_example`, follow-ups picked from
    the whole list, so a limited run evaluates the full run's first conversations), evaluated
    (`evaluate_conversation`) and summarized (`summarize_conversations`). Resumable: each example's rows are
    appended to `rows_path` (JSONL) with its follow-up question as soon as they are measured, and examples
    already there with the same follow-up are skipped (an entry with another follow-up, or none recorded, is
    measured again, as is one of an example whose content changed under the same id, or one measured with another
    model, answer length, estimator, groundedness calibration or baselines: its rows hold their scores, see
    `measurement_key`). `baselines` must fit the model's heads (checked before any work)."""
    for est in (baselines or {}).values():
        est.check_compatible(attributor.num_layers, attributor.num_heads)
    if limit is not None and limit < 1:
        raise InvalidInputError(f"limit must be at least 1 example, got {limit}")
    chosen = list(examples[:limit] if limit else examples)
    expected = {e.id: {"query": follow_up(examples, i)[1], "example_digest": example_digest(e)}
                for i, e in enumerate(chosen)}
    path = Path(rows_path)
    key = measurement_key(attributor, max_new_tokens, baselines or {})
    entries = _current_entries(path, read_row_entries(path), expected, key)
    done = {entry["example"] for entry in entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    todo = [i for i, e in enumerate(chosen) if e.id not in done]
    with path.open("a") as out:
        for i in tqdm(todo, desc="conversations", unit="example"):
            conversation = conversation_example(attributor, examples, i, first_turn_tokens=max_new_tokens)
            rows = evaluate_conversation(
                attributor, conversation, max_new_tokens=max_new_tokens, batch_size=batch_size, baselines=baselines
            )
            entry = {"example": chosen[i].id, **expected[chosen[i].id], "measured_with": key, "rows": rows}
            out.write(json.dumps(entry) + "\n")
            out.flush()
            entries.append(entry)
    rows = [r for entry in entries if entry["example"] in expected for r in entry["rows"]]
    return summarize_conversations(rows)


def estimator_digest(estimator: ScoreEstimator, grounding: GroundednessCalibration | None = None) -> str:
    """Of an estimator's weights (and a groundedness calibration, head included): equal only for equal values."""
    h = hashlib.sha256(estimator.weights.detach().to(torch.float32).contiguous().numpy().tobytes())
    if grounding is not None:
        fields = {f.name: getattr(grounding, f.name) for f in dataclasses.fields(grounding)}
        h.update(json.dumps({k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in fields.items()},
                            sort_keys=True).encode())
    return h.hexdigest()[:16]


def measurement_key(
    attributor: Attributor, max_new_tokens: int, baselines: Mapping[str, ScoreEstimator]
) -> dict[str, Any]:
    """What a conversation's rows depend on besides the conversation: the model and answer length (the runs), the
    estimator and its groundedness calibration (the scores, `grounded`, `supported`) and the baselines (their
    tops). Recorded with every entry, so a resumed run never mixes rows scored by another estimator."""
    return {
        "model": str(attributor.model_id or ""),
        "max_new_tokens": max_new_tokens,
        "estimator": estimator_digest(attributor.estimator, attributor.scorer.groundedness(refined=False)),
        "baselines": {name: estimator_digest(est) for name, est in sorted(baselines.items())},
    }


def _current_entries(
    path: Path, entries: list[dict[str, Any]], expected: dict[str, dict[str, str]], key: dict[str, Any]
) -> list[dict[str, Any]]:
    """The entries still valid for these conversations: an entry of one of them whose follow-up question or
    example content (`expected`) differs from the current one, or that was measured with another
    `measurement_key` (or recorded none of these), is dropped from the file, logged, and measured again; entries
    of other examples stay in the file."""
    kept: list[dict[str, Any]] = []
    stale: dict[str, list[str]] = {"question": [], "content": [], "key": []}
    for entry in entries:
        current = expected.get(entry["example"])
        if current is None:
            kept.append(entry)
        elif entry.get("query") != current["query"]:
            stale["question"].append(entry["example"])
        elif entry.get("example_digest") != current["example_digest"]:
            stale["content"].append(entry["example"])
        elif entry.get("measured_with") != key:
            stale["key"].append(entry["example"])
        else:
            kept.append(entry)
    reasons = {
        "question": "another follow-up question",
        "content": "another question, documents or history under the same example id",
        "key": "another model, answer length, estimator, calibration or baselines",
    }
    for reason, ids in stale.items():
        if ids:
            logger.warning("%s: %d entries were measured with %s (or before that was recorded), e.g. %s: measuring "
                           "them again", path, len(ids), reasons[reason], ids[0])
    if len(kept) == len(entries):
        return entries
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(e) + "\n" for e in kept))
    return kept


def conversation_record(summary: dict[str, Any], examples: str) -> dict[str, Any]:
    """The summary as the estimator's `metadata["conversations"]` keeps it (the model card shows it)."""
    return {
        "heldout": f"{summary['examples']} multi-turn conversations from {examples}, {summary['targets']} answer "
        "sentences (at2-rag evaluate --conversations)",
        "top1_agreement_with_leave_one_out": summary["top1_agreement_at2"],
        "top1_agreement_average_attention": summary["top1_agreement_average"],
        "top1_agreement_documents_only": summary["top1_agreement_documents_only"],
        **{f"top1_agreement_{name}": v for name, v in summary.get("top1_agreement_baselines", {}).items()},
        **({"leave_one_out_near_ties": summary["leave_one_out_near_ties"],
            "top1_agreement_on_clear_targets": summary["top1_agreement_at2_clear_targets"],
            "top1_within_near_tie_of_leave_one_out": summary["top1_within_near_tie_of_leave_one_out"]}
           if "leave_one_out_near_ties" in summary else {}),
        "groundedness_auroc": summary["groundedness_auroc_at2"],
        "groundedness_auroc_score_sum": summary["groundedness_auroc_at2_score_sum"],
        "groundedness_auroc_average_attention": summary["groundedness_auroc_average"],
        "supported_precision": summary["supported_precision"],
        "supported_recall": summary["supported_recall"],
    }


def record_conversations(folder: str | os.PathLike[str], summary: dict[str, Any], examples: str) -> None:
    """Keep a conversation evaluation in the estimator's config and model card (other metadata untouched)."""
    estimator = ScoreEstimator.from_folder(folder)
    previous = estimator.metadata.get("conversations")
    record = conversation_record(summary, examples)
    if isinstance(previous, dict):  # keys other benches recorded (e.g. the single-turn groundedness AUROC) stay;
        # an earlier run's baselines do not (they were measured on other runs, or are gone)
        record = {**record, **{k: v for k, v in previous.items() if k not in record and not k.startswith("top1_")}}
    estimator.metadata["conversations"] = record
    estimator.update_card(folder)
