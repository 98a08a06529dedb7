"""Groundedness, offline: does `Citation.grounded` tell sentences that depend on the documents from those that
do not? Calibrated and measured on the collected ablation data.

Of the 32 random masks of a collected target, some remove every document (each document is kept with
probability 1/2, 4-6 documents per example): for those targets the all-documents-removed label is measured.
The head and the calibration `grounded = scale * sum(document scores) + history_scale * sum(earlier turns'
scores) + offset` (log-odds, nats) are fitted as `at2-rag train` fits them (`fit_groundedness_settings`,
at2_rag/training/groundedness.py) on the training split and, when collected, the multi-turn training
conversations (`collect --sources context`, whose last mask removes every document); a sentence is supported
when grounded >= 1 nat. The multi-turn held-out evaluation's rows (bench/conversations.py) are scored too. AUROC of
grounded against "removing every document lowers the sentence's log-probability by >= 1 nat", and precision and
recall of supported, are reported on the held-out split (the split the shipped estimator was trained with), with
bootstrap standard errors, beside the score-sum calibration, average attention and the cross-validated choice
of the head's ridge and cap. Writes docs/bench/groundedness.json. (`at2-rag train` writes the settings into an
estimator; the shipped one's were fitted by the same function.)

    python -m research.groundedness --conversations data/collected/smollm2-conversations \
        data/collected/smollm2-conversations-more
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from at2_rag.attribution.estimator import ScoreEstimator
from at2_rag.attribution.grounding import DEFAULT_THRESHOLD, HEAD_RIDGE, HEAD_TARGET_CAP, auroc, fit_groundedness_head
from at2_rag.evaluation.metrics import bootstrap_se
from at2_rag.training.data import load_collected
from at2_rag.training.groundedness import fit_groundedness_settings, no_documents_targets
from at2_rag.training.train import split_examples

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def removed_all(examples, weights):
    """Every target with an all-documents-removed label (`at2_rag.training.groundedness.no_documents_targets`, what
    `at2-rag train` fits on): `[N, 5]` rows of (document score sum, earlier turns' score sum, log-odds drop,
    log-prob drop, max document score), and the target's features summed over the documents and over the earlier
    turns (`[N, L*H]` each, for the learned head)."""
    found = no_documents_targets(examples, weights)
    return found.rows, found.document_features, found.history_features


def example_folds(examples, folds: int = 5, seed: int = 0) -> list[int]:
    """A fold per example (targets of one example stay together)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    fold = [0] * len(examples)
    for rank, i in enumerate(order):
        fold[i] = rank % folds
    return fold


def cross_validate_head(examples, weights, ridges, caps, folds: int = 5) -> dict[str, float]:
    """Grouped k-fold AUROC of the learned head for each (ridge, cap) on the fitting examples alone: how
    HEAD_RIDGE and HEAD_TARGET_CAP were chosen, never on held-out data."""
    fold_of = example_folds(examples, folds)
    parts = [(removed_all([ex], weights), fold_of[i]) for i, ex in enumerate(examples)]
    parts = [(p, f) for p, f in parts if len(p[0])]
    rows = torch.cat([p[0] for p, _ in parts])
    docs = torch.cat([p[1] for p, _ in parts])
    hist = torch.cat([p[2] for p, _ in parts])
    fold = torch.cat([torch.full((len(p[0]),), f) for p, f in parts])
    positive = rows[:, 3] >= 1.0
    out = {}
    for ridge in ridges:
        for cap in caps:
            predicted = torch.zeros(len(rows), dtype=torch.double)
            for k in range(folds):
                train, test = fold != k, fold == k
                doc_w, hist_w, offset = fit_groundedness_head(docs[train], hist[train], rows[train, 2], ridge, cap)
                predicted[test] = docs[test] @ doc_w + hist[test] @ hist_w + offset
            out[f"ridge={ridge:g},cap={cap:g}"] = auroc(predicted, positive)
    return out


def conversation_rows(path: Path) -> torch.Tensor:
    """The conversation evaluation's rows (bench/conversations.py): document and earlier-turn score sums and
    the measured log-prob drop with every document removed."""
    rows = [r for line in path.read_text().splitlines() for r in json.loads(line)["rows"]]
    return torch.tensor(
        [
            (r["document_score_sum"], r["history_score_sum"], r["no_documents_log_prob_drop"])
            for r in rows
            if "history_score_sum" in r
        ],
        dtype=torch.double,
    ).reshape(-1, 3)


def precision_recall(predicted: torch.Tensor, positive: torch.Tensor) -> tuple[float, float]:
    tp = float((predicted & positive).sum())
    return tp / max(1.0, float(predicted.sum())), tp / max(1.0, float(positive.sum()))


def measure(name: str, grounded: torch.Tensor, log_prob_drops: torch.Tensor) -> dict[str, float]:
    """AUROC of `grounded` against "depends on the documents" (drop >= 1 nat), precision and recall of
    supported, with bootstrap standard errors, and the correlation with the capped drop."""
    positive = log_prob_drops >= 1.0
    supported = grounded >= DEFAULT_THRESHOLD
    n = len(grounded)
    p, r = precision_recall(supported, positive)
    capped = log_prob_drops.clamp(-HEAD_TARGET_CAP, HEAD_TARGET_CAP)
    return {
        f"auroc_{name}": auroc(grounded, positive),
        f"auroc_{name}_se": bootstrap_se(lambda i: auroc(grounded[i], positive[i]), n),
        f"supported_precision_{name}": p,
        f"supported_precision_{name}_se": bootstrap_se(lambda i: precision_recall(supported[i], positive[i])[0], n),
        f"supported_recall_{name}": r,
        f"supported_recall_{name}_se": bootstrap_se(lambda i: precision_recall(supported[i], positive[i])[1], n),
        f"correlation_{name}_vs_capped_drop": float(torch.corrcoef(torch.stack([grounded, capped]))[0, 1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collected", default="data/collected/smollm2-train")
    parser.add_argument("--out", default="docs/bench/groundedness.json")
    parser.add_argument("--conversations", nargs="+",
                        default=["data/collected/smollm2-conversations", "data/collected/smollm2-conversations-more"],
                        help="folder(s) of multi-turn shards collected with --sources context (fitted too, when "
                        "present)")
    parser.add_argument("--conversation-rows", default="docs/bench/conversations.jsonl",
                        help="rows of bench/conversations.py: the multi-turn held-out evaluation")
    args = parser.parse_args()

    estimator = ScoreEstimator.shipped(MODEL)
    weights = estimator.weights.detach()
    uniform = torch.full_like(weights, 1.0 / weights.numel())
    train_ex, held_ex = split_examples(load_collected(args.collected), 0.15, 0)
    multi_ex = [ex for folder in args.conversations if Path(folder).is_dir() for ex in load_collected(folder)]
    train, held = removed_all(train_ex, weights), removed_all(held_ex, weights)
    held_uniform = removed_all(held_ex, uniform)[0]
    multi = removed_all(multi_ex, weights)
    fitted = fit_groundedness_settings(list(train_ex) + multi_ex, weights, held_ex, source="research/groundedness.py",
                                       multi_turn_examples="every example").settings
    assert fitted is not None, "no target with every document removed"
    scale, offset, history_scale = fitted["scale"], fitted["offset"], fitted["history_scale"]
    threshold = DEFAULT_THRESHOLD  # nats: the definition itself, not a number tuned to the data
    cv = cross_validate_head(list(train_ex) + list(multi_ex), weights, (100, 300, 1000, 3000), (3, 5, 8))
    doc_w = torch.tensor(fitted["document_weights"], dtype=torch.double)
    hist_w = torch.tensor(fitted.get("history_weights", [0.0] * weights.numel()), dtype=torch.double)
    head_offset = fitted["head_offset"]

    held_rows, held_docs, held_hist = held
    positive = held_rows[:, 3] >= 1.0
    n = len(held_rows)
    predictions = {
        "head": held_docs @ doc_w + held_hist @ hist_w + head_offset,
        "sum": scale * held_rows[:, 0] + history_scale * held_rows[:, 1] + offset,
    }
    report = {
        "fit_targets_single_turn": len(train[0]),
        "fit_targets_multi_turn": len(multi[0]),
        "heldout_targets": n,
        "heldout_positive_rate": float(positive.double().mean()),
        "scale": scale,
        "offset": offset,
        "history_scale": history_scale,
        "threshold": threshold,
        "head_ridge": HEAD_RIDGE,
        "head_target_cap": HEAD_TARGET_CAP,
        "head_cross_validated_auroc": cv,
    }
    for name, grounded in predictions.items():
        report.update(measure(name, grounded, held_rows[:, 3]))
    old_rule = held_rows[:, 4] >= float(estimator.metadata.get("support_threshold", 0.05))
    p_old, r_old = precision_recall(old_rule, positive)
    report.update(
        {
            "auroc_average_attention": auroc(held_uniform[:, 0], positive),
            "auroc_average_attention_se": bootstrap_se(lambda i: auroc(held_uniform[i, 0], positive[i]), n),
            "auroc_max_document_score": auroc(held_rows[:, 4], positive),
            "old_rule_precision": p_old,
            "old_rule_recall": r_old,
        }
    )
    conversations = Path(args.conversation_rows)
    if conversations.exists() and len(conversation_rows(conversations)):
        rows = conversation_rows(conversations)  # score sums: the sum calibration (the head's own rows: below)
        c_grounded = scale * rows[:, 0] + history_scale * rows[:, 1] + offset
        c_positive = rows[:, 2] >= 1.0
        m = len(rows)
        report.update(
            {
                "conversation_targets": m,
                "conversation_positive_rate": float(c_positive.double().mean()),
                "conversation_auroc_sum": auroc(c_grounded, c_positive),
                "conversation_auroc_sum_se": bootstrap_se(lambda i: auroc(c_grounded[i], c_positive[i]), m),
                "conversation_auroc_documents_only": auroc(rows[:, 0], c_positive),
            }
        )
    for key, value in report.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
