"""Fit the groundedness settings an estimator carries (`metadata["groundedness"]`) on collected data.

`Citation.grounded` predicts how much an answer sentence's log-odds would drop with every document removed
(at2_rag.attribution.grounding). It is fitted on the collected targets whose masks include one that removes every
document: in `collect --sources context` shards the all-documents-removed mask each example records; in
single-turn shards (`--sources documents`, `sentences`, `tokens`) a random mask that happened to remove them all
(each source kept with probability 1/2, 4-6 documents: a few per cent of the masks).

Two calibrations come out of the same targets: the learned head (ridge regression of the capped log-odds drop
on the target's attention features summed over the documents and over the earlier turns; `fit_groundedness_head`)
and the score-sum fallback (`fit_groundedness`, which depends on the estimator's weights). Earlier-turn weights
are fitted only when some target has earlier turns (multi-turn shards): a single-turn fit leaves them out, so the
head reads no conversation history it never saw.

The held-out split of the weights' training (the same examples, never fitted on) measures the head: AUROC of
`grounded` against "removing every document lowers the sentence's log-probability by >= 1 nat", with a bootstrap
standard error over targets.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..attribution.grounding import (
    DEFAULT_THRESHOLD,
    HEAD_RIDGE,
    HEAD_TARGET_CAP,
    auroc,
    fit_groundedness,
    fit_groundedness_head,
)
from ..stats import bootstrap_se
from .data import CollectedExample, mask_kinds

logger = logging.getLogger(__name__)

# fewer fitting targets than this and the settings are not written (the runtime falls back, and says so)
MIN_FIT_TARGETS = 10


@dataclass
class NoDocumentsTargets:
    """Targets with an all-documents-removed label. `rows` `[N, 5]`: (document score sum, earlier turns' score
    sum, log-odds drop, log-prob drop, max document score); `document_features` / `history_features` `[N, L*H]`:
    the target's features summed over the documents / the earlier turns (zeros without earlier turns);
    `multi_turn` `[N]`: the target's example was collected with `--sources context` (a conversation);
    `with_history` `[N]`: it has earlier turns among its sources."""

    rows: torch.Tensor
    document_features: torch.Tensor
    history_features: torch.Tensor
    multi_turn: torch.Tensor
    with_history: torch.Tensor

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, index: torch.Tensor) -> NoDocumentsTargets:
        return NoDocumentsTargets(self.rows[index], self.document_features[index], self.history_features[index],
                                  self.multi_turn[index], self.with_history[index])


def no_documents_mask(example: CollectedExample) -> tuple[int, int] | None:
    """`(mask index, number of documents)`: the example's all-documents-removed mask (`collect --sources context`
    records one; documents come first among the sources), else the first mask that removes every source of a
    single-turn example; None when no mask removes every document."""
    kinds = mask_kinds(example)
    if "no_documents" in kinds:
        return kinds.index("no_documents"), int(example.meta["num_documents"])
    if example.meta.get("sources") == "context":
        return None  # a random mask removing every document may also remove earlier turns: not the label
    gone = (~example.masks).all(dim=1).nonzero().flatten()
    return (int(gone[0]), example.masks.shape[1]) if len(gone) else None


def no_documents_targets(examples: Sequence[CollectedExample], weights: torch.Tensor) -> NoDocumentsTargets:
    """Every target of `examples` with an all-documents-removed label, scored with `weights` (`[L*H]`)."""
    weights = weights.detach().double()
    rows, doc_features, history_features, multi_turn, with_history = [], [], [], [], []
    for ex in examples:
        found = no_documents_mask(ex)
        if found is None:
            continue
        m, n_docs = found
        ids = ex.meta.get("source_ids") or []
        history = [j for j, key in enumerate(ids) if str(key).startswith("history:")]
        for t in range(ex.features.shape[0]):
            features = ex.features[t].double()
            scores = features @ weights
            full, removed = float(ex.full[t]), float(ex.labels[t, m])
            log_p = torch.nn.functional.logsigmoid(torch.tensor([full, removed], dtype=torch.double))
            rows.append((
                float(scores[:n_docs].sum()),
                float(scores[history].sum()) if history else 0.0,
                full - removed,
                float(log_p[0] - log_p[1]),
                float(scores[:n_docs].max()),
            ))
            doc_features.append(features[:n_docs].sum(0))
            history_features.append(features[history].sum(0))
            multi_turn.append(ex.meta.get("sources") == "context")
            with_history.append(bool(history))
    width = weights.numel()

    def stack(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(xs) if xs else torch.zeros(0, width, dtype=torch.double)

    return NoDocumentsTargets(torch.tensor(rows, dtype=torch.double).reshape(-1, 5), stack(doc_features),
                              stack(history_features), torch.tensor(multi_turn, dtype=torch.bool),
                              torch.tensor(with_history, dtype=torch.bool))


@dataclass
class GroundednessFit:
    """What `fit_groundedness_settings` made: `settings` (for `metadata["groundedness"]`, None when it could not
    fit) and `reason` (why not, or what the fit left out: the earlier-turn weights of a single-turn fit)."""

    settings: dict[str, Any] | None
    reason: str | None = None


def heldout_auroc(settings: dict[str, Any], heldout: NoDocumentsTargets) -> dict[str, Any] | None:
    """AUROC of the head's `grounded` on held-out targets, its bootstrap standard error and the count; None when
    one class is missing (no AUROC to measure)."""
    positive = heldout.rows[:, 3] >= 1.0
    if len(heldout) == 0 or bool(positive.all()) or not bool(positive.any()):
        return None
    predicted = heldout.document_features @ torch.tensor(settings["document_weights"], dtype=torch.double)
    if settings.get("history_weights") is not None:
        predicted = predicted + heldout.history_features @ torch.tensor(settings["history_weights"],
                                                                        dtype=torch.double)
    predicted = predicted + settings["head_offset"]
    n = len(heldout)
    return {"mean": auroc(predicted, positive),
            "se": bootstrap_se(lambda i: auroc(predicted[i], positive[i]), n), "n": n}


def fit_groundedness_settings(
    fit_examples: Sequence[CollectedExample],
    weights: torch.Tensor,
    heldout_examples: Sequence[CollectedExample] = (),
    ridge: float = HEAD_RIDGE,
    cap: float = HEAD_TARGET_CAP,
    threshold: float = DEFAULT_THRESHOLD,
    source: str = "at2-rag train",
    multi_turn_examples: str = "training split",
) -> GroundednessFit:
    """The groundedness head and score-sum calibration fitted on `fit_examples`' all-documents-removed targets
    (scored with the estimator's `weights`), measured on `heldout_examples`' (`heldout_auroc_single_turn` /
    `heldout_auroc_multi_turn`). `source` names what fitted them in `fitted_on`, `multi_turn_examples` which
    examples of the multi-turn sets were fitted on."""
    fit = no_documents_targets(fit_examples, weights)
    if len(fit) < MIN_FIT_TARGETS:
        return GroundednessFit(None, (
            f"only {len(fit)} training target(s) have a mask removing every document (at least {MIN_FIT_TARGETS} "
            "needed): collect multi-turn examples with `collect --sources context` (each records an "
            "all-documents-removed mask), or more single-turn examples"))
    has_history = bool(fit.with_history.any())
    scale, offset, history_scale = fit_groundedness(fit.rows[:, 0], fit.rows[:, 2],
                                                    fit.rows[:, 1] if has_history else None)
    doc_w, hist_w, head_offset = fit_groundedness_head(fit.document_features, fit.history_features, fit.rows[:, 2],
                                                       ridge, cap)
    single, multi = int((~fit.multi_turn).sum()), int(fit.multi_turn.sum())
    settings: dict[str, Any] = {
        "scale": scale,
        "offset": offset,
        "history_scale": history_scale,
        "threshold": threshold,
        "document_weights": doc_w.tolist(),
        **({"history_weights": hist_w.tolist()} if has_history else {}),
        "head_offset": head_offset,
    }
    reason = None if has_history else (
        "no training target has earlier turns (multi-turn shards from `collect --sources context`): the head has no "
        "earlier-turn weights, so in a conversation it reads the documents alone")
    held = no_documents_targets(heldout_examples, weights)
    for name, part in (("single_turn", ~held.multi_turn), ("multi_turn", held.multi_turn)):
        measured = heldout_auroc(settings, held.select(part))
        if measured is not None:
            settings[f"heldout_auroc_{name}"] = measured
    settings["fitted_on"] = (
        f"{single} single-turn (training split) and {multi} multi-turn ({multi_turn_examples}) targets with every "
        f"document removed ({source}); "
        f"head: ridge {ridge:g} on standardized features, log-odds drops capped at {cap:g} nats"
    )
    return GroundednessFit(settings, reason)
