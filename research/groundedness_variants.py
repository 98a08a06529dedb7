"""Variants of the groundedness head, cross-validated on the multi-turn training conversations.

Grouped 5-fold cross-validation over conversations (the single-turn training targets are always in the fit), AUROC
of the out-of-fold prediction against "removing every document lowers the log-probability by >= 1 nat"; and the
single-turn held-out AUROC of each variant fitted on everything. Variants: the shipped head
(`fit_groundedness_head`: document and earlier-turn sums, ridge 1000, drops capped at 5 nats), the same with the
multi-turn targets weighted 3x, with the question's and system prompt's feature sums, the top-scored document's
features, the log of the sentence's length, the sentence's own log-odds with every source kept (free at inference:
the answer's logits) or its word-bigram overlap with the documents and with the earlier answers (text, no attention)
as further inputs, with square-root or log feature sums, and fitted to the log-probability drop (what the label
thresholds) instead of the log-odds drop. Writes docs/bench/groundedness_variants.json.

    python -m research.groundedness_variants --conversations FOLDER [FOLDER ...] [--examples JSONL ...]
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from at2_rag.attribution.estimator import ScoreEstimator
from at2_rag.attribution.grounding import HEAD_RIDGE, HEAD_TARGET_CAP, auroc
from at2_rag.training.data import CollectedExample, load_collected
from at2_rag.training.train import split_examples
from research.groundedness import example_folds, removed_all

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
FOLDS = 5
# `blocks(extra=...)` variants measured as one further input beside the shipped head's blocks
FURTHER_INPUTS = {
    "top": "+ top-scored document's features",
    "length": "+ log sentence length",
    "full": "+ the sentence's log-odds with every source kept",
    "text": "+ bigram overlap with the documents and the earlier answers",
}


def context_sums(ex: CollectedExample, kind: str) -> torch.Tensor:
    """Per target, the features summed over the context parts of one kind ("query", "system"); zeros without."""
    n_docs = int(ex.meta.get("num_documents", ex.features.shape[1]))
    ids = ex.meta.get("source_ids") or []
    columns = [j for j, key in enumerate(ids) if j >= n_docs and key == kind]
    return ex.features[:, columns].double().sum(1)


def top_document(ex: CollectedExample, weights: torch.Tensor) -> torch.Tensor:
    """Per target, the features of the document the estimator scores highest."""
    n_docs = int(ex.meta.get("num_documents", ex.features.shape[1]))
    features = ex.features[:, :n_docs].double()
    best = (features @ weights.double()).argmax(1)
    return features[torch.arange(len(best)), best]


def bigrams(text: str) -> set[tuple[str, str]]:
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    return set(zip(words, words[1:], strict=False))


def text_overlap(ex: CollectedExample, raw: dict[str, dict]) -> torch.Tensor:
    """Per target `[N, 2]`: the share of the sentence's word bigrams found in the documents but not in the earlier
    answers, and the share found in the earlier answers (the example's texts from its JSONL record)."""
    record = raw.get(ex.meta["id"])
    if record is None:
        raise SystemExit(f"example {ex.meta['id']!r} is in none of the --examples files (its texts are needed)")
    documents = bigrams("\n".join(d["text"] for d in record["documents"]))
    earlier = bigrams("\n".join(m["content"] for m in record.get("history", []) if m["role"] == "assistant"))
    rows = []
    for start, end in ex.meta["targets"]:
        grams = bigrams(ex.meta["answer"][start:end])
        n = max(1, len(grams))
        rows.append([len((grams & documents) - earlier) / n, len(grams & earlier) / n])
    return torch.tensor(rows, dtype=torch.double)


def blocks(ex: CollectedExample, weights: torch.Tensor, extra: str = "", target: str = "log_odds",
           raw: dict[str, dict] | None = None):
    """(feature blocks `[N, L*H]` each, capped-drop target, positive label) of an example's removed-all targets.
    `extra`: "context" adds the question's and system prompt's sums, "top" the top-scored document's features,
    "length" the log of the sentence's length in characters (the drop is a sum over its tokens), "full" the
    sentence's log-odds with every source kept (clipped to +-30), "text" its bigram overlap (`text_overlap`);
    `target`: the log-odds drop (shipped) or the log-probability drop (what the label thresholds)."""
    rows, docs, hist = removed_all([ex], weights)
    if not len(rows):
        return None
    parts = [docs, hist]
    if extra == "context":  # removed_all keeps every target of an example, in order
        parts += [context_sums(ex, "query"), context_sums(ex, "system")]
    elif extra == "top":
        parts.append(top_document(ex, weights))
    elif extra == "length":
        chars = torch.tensor([float(max(1, end - start)) for start, end in ex.meta["targets"]], dtype=torch.double)
        parts.append(chars.log().unsqueeze(1))
    elif extra == "full":
        parts.append(ex.full.double().clamp(-30, 30).unsqueeze(1))
    elif extra == "text":
        parts.append(text_overlap(ex, raw or {}))
    return parts, rows[:, 2 if target == "log_odds" else 3], rows[:, 3] >= 1.0


def fit(parts_list, targets, weights_of_rows, transform, shared_spread: bool):
    """Ridge on standardized blocks (by the document block's spread when `shared_spread`, as the shipped head)."""
    x = [torch.cat([transform(p[b]) for p in parts_list]) for b in range(len(parts_list[0]))]
    means = [block.mean(0) for block in x]
    spreads = [block.std(0).clamp_min(1e-9) for block in x]
    if shared_spread:  # blocks as wide as the document block share its standardization
        means = [means[0] if m.shape == means[0].shape else m for m in means]
        spreads = [spreads[0] if v.shape == spreads[0].shape else v for v in spreads]

    def design(blocks_: list[torch.Tensor]) -> torch.Tensor:
        cols = [(transform(b) - m) / s for b, m, s in zip(blocks_, means, spreads, strict=True)]
        return torch.cat(cols + [torch.ones(len(blocks_[0]), 1, dtype=torch.double)], 1)

    d = design([torch.cat([p[b] for p in parts_list]) for b in range(len(parts_list[0]))])
    w = weights_of_rows.unsqueeze(1)
    penalty = torch.eye(d.shape[1], dtype=torch.double) * HEAD_RIDGE
    penalty[-1, -1] = 0.0
    solution = torch.linalg.solve(d.T @ (w * d) + penalty, d.T @ (w.squeeze(1) * targets.clamp(-HEAD_TARGET_CAP,
                                                                                                    HEAD_TARGET_CAP)))
    return lambda blocks_: design(blocks_) @ solution


def evaluate(single, multi, held, transform: Callable, shared_spread: bool, multi_weight: float = 1.0):
    folds = example_folds(multi, FOLDS)
    predictions, labels = [], []
    for k in range(FOLDS):
        train = single + [m for m, f in zip(multi, folds, strict=True) if f != k]
        weights = torch.cat([torch.full((len(t[1]),), multi_weight if i >= len(single) else 1.0, dtype=torch.double)
                             for i, t in enumerate(train)])
        head = fit([t[0] for t in train], torch.cat([t[1] for t in train]), weights, transform, shared_spread)
        for m, f in zip(multi, folds, strict=True):
            if f == k:
                predictions.append(head(m[0]))
                labels.append(m[2])
    everything = single + multi
    head = fit([t[0] for t in everything], torch.cat([t[1] for t in everything]),
               torch.ones(sum(len(t[1]) for t in everything), dtype=torch.double), transform, shared_spread)
    return {
        "multi_turn_cross_validated_auroc": auroc(torch.cat(predictions), torch.cat(labels)),
        "single_turn_heldout_auroc": auroc(torch.cat([head(h[0]) for h in held]), torch.cat([h[2] for h in held])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collected", default="data/collected/smollm2-train")
    parser.add_argument("--conversations", nargs="+", default=["data/collected/smollm2-conversations"])
    parser.add_argument("--examples", nargs="+", default=[
        "data/rag_python_docs/train.jsonl", "data/rag_python_docs/train_conversations.jsonl",
        "data/rag_python_docs/train_conversations_more.jsonl"], help="the collected examples' JSONL files (texts for "
        "the bigram-overlap variant)")
    parser.add_argument("--out", default="docs/bench/groundedness_variants.json")
    args = parser.parse_args()
    raw = {(r := json.loads(line))["id"]: r for path in args.examples for line in Path(path).read_text().splitlines()
           if line.strip()}
    weights = ScoreEstimator.shipped(MODEL).weights.detach()
    train_ex, held_ex = split_examples(load_collected(args.collected), 0.15, 0)
    conversations = [ex for folder in args.conversations for ex in load_collected(folder)]
    identity = lambda x: x  # noqa: E731
    report = {}
    for extra, target in (
        ("", "log_odds"), ("context", "log_odds"), ("top", "log_odds"), ("length", "log_odds"), ("", "log_prob"),
        ("full", "log_odds"), ("text", "log_odds"),
    ):
        single = [b for ex in train_ex if (b := blocks(ex, weights, extra, target, raw))]
        held = [b for ex in held_ex if (b := blocks(ex, weights, extra, target, raw))]
        multi = [b for ex in conversations if (b := blocks(ex, weights, extra, target, raw))]
        measured_before = len(report)
        if target == "log_prob":
            report["log-probability drop as the target"] = evaluate(single, multi, held, identity, True)
        elif extra in FURTHER_INPUTS:
            report[FURTHER_INPUTS[extra]] = evaluate(single, multi, held, identity, True)
        elif not extra:
            report["shipped head"] = evaluate(single, multi, held, identity, shared_spread=True)
            report["multi-turn targets weighted 3x"] = evaluate(single, multi, held, identity, True, 3.0)
            report["each block standardized on its own"] = evaluate(single, multi, held, identity, False)
            report["square-root sums (own standardization)"] = evaluate(
                single, multi, held, lambda x: x.clamp_min(0).sqrt(), False
            )
            report["log sums (own standardization)"] = evaluate(
                single, multi, held, lambda x: torch.log(x.clamp_min(0) + 1e-4), False
            )
        else:
            report["+ question and system prompt sums (own standardization)"] = evaluate(
                single, multi, held, identity, False
            )
        for name in list(report)[measured_before:]:
            print(name, {k: round(v, 4) for k, v in report[name].items()}, flush=True)
    report["conversations"] = len(conversations)
    report["conversation_folders"] = args.conversations
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
