"""Ablation evidence (`ablations=k`): which k masks over the documents and earlier turns to run, and their
answer log-probabilities, measured by teacher-forced passes with the removed sources masked out of attention.

A mask the run itself (everything kept) or the measured groundedness passes (every document removed, every earlier
turn removed) already answered is reused, not run twice. The masks are a design decided before any pass (seeded by
the prompt and answer, label-free), so the same request gets the same masks; `attribution.refine` turns the
evidence into refined scores.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..capture.captured import Captured, model_lock
from ..capture.masked import ablated_answer_logit_probs
from ..errors import InvalidInputError
from .groundedness import GroundednessEvidence
from .layout import refinement_units

logger = logging.getLogger(__name__)

ABLATION_BATCH_SIZE = 8
MAX_EXACT_SOURCES = 20  # above this, 2**n distinct masks is never a cap worth computing
DESIGN_RIDGE = 0.3  # the mask design's prior information, in passes (the refinement's default prior strength)


@dataclass
class AblationEvidence:
    """k ablation passes of one run: `masks[k, units]` keep bits over the refinement units (documents, then earlier
    turns), `logit_probs[k, answer tokens]` the answer's logit-probs under each, `passes` how many were run (the
    rest reused measured ones)."""

    masks: torch.Tensor
    logit_probs: torch.Tensor
    passes: int


def check_ablations(ablations: Any) -> int:
    """`ablations` must be a non-negative integer (bool is refused: `True` is not a number of passes)."""
    if isinstance(ablations, bool) or not isinstance(ablations, int):
        raise InvalidInputError(f"ablations must be a non-negative integer, got {ablations!r}")
    if ablations < 0:
        raise InvalidInputError(f"ablations must be a non-negative integer, got {ablations}")
    return ablations


def distinct_mask_count(num_sources: int) -> int:
    return 2**num_sources if num_sources <= MAX_EXACT_SOURCES else 2**MAX_EXACT_SOURCES


def _random_distinct(num_sources: int, count: int, generator: torch.Generator) -> torch.Tensor:
    seen: set[bytes] = set()
    rows: list[torch.Tensor] = []
    while len(rows) < count:
        row = torch.rand(num_sources, generator=generator) < 0.5
        key = row.numpy().tobytes()
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return torch.stack(rows) if rows else torch.zeros(0, num_sources, dtype=torch.bool)


def most_informative(pool: torch.Tensor, k: int, ridge: float = DESIGN_RIDGE) -> list[int]:
    """Greedy D-optimal choice of k masks from `pool`: each adds the most information about the effects (with
    an intercept) given those already chosen, i.e. runs where the posterior is least certain. Label-free, so
    it is a design decided before any pass is run."""
    design = torch.cat([torch.ones(pool.shape[0], 1), pool.float()], dim=1).double()
    information = torch.eye(design.shape[1], dtype=torch.double) * ridge
    chosen: list[int] = []
    for _ in range(min(k, pool.shape[0])):
        gain = torch.einsum("mi,ij,mj->m", design, torch.linalg.inv(information), design)
        gain[chosen] = -1.0
        best = int(gain.argmax())
        chosen.append(best)
        information += torch.outer(design[best], design[best])
    return chosen


def choose_masks(num_sources: int, k: int, seed_text: str = "", pool_size: int = 64) -> torch.Tensor:
    """`[k', num_sources]` distinct keep-masks, k' = min(k, 2^n): the k most informative (`most_informative`)
    of a pool of random masks (each source kept with probability 1/2). research/refinement.py compares this with
    the first k random masks: it lifts LDS at every small k (docs/benchmarks.md).

    Seeded by `seed_text` (the prompt and answer), so the same request gets the same masks.
    """
    limit = distinct_mask_count(num_sources)
    if k > limit:
        logger.info("ablations=%d capped at %d: %d sources have only %d distinct masks", k, limit, num_sources, limit)
        k = limit
    seed = int.from_bytes(hashlib.sha256(seed_text.encode("utf-8", "surrogatepass")).digest()[:8], "little") >> 1
    generator = torch.Generator().manual_seed(seed)
    if k == limit and num_sources <= MAX_EXACT_SOURCES:  # every mask, in a random order
        every = torch.arange(limit).unsqueeze(1).bitwise_and(1 << torch.arange(num_sources)).ne(0)
        return every[torch.randperm(limit, generator=generator)]
    pool = _random_distinct(num_sources, min(limit, max(pool_size, 2 * k)), generator)
    return pool[most_informative(pool, k)]


def gather_ablations(
    model: Any, run: Captured, ablations: int, known: GroundednessEvidence | None = None
) -> AblationEvidence | None:
    """`ablations=k` passes over the run's documents and earlier turns (None when there is nothing to ablate:
    k = 0, no sources or an empty answer). `known`: the measured groundedness evidence, whose masks are reused."""
    prompt, answer = run.prompt, run.answer
    spans, units = refinement_units(prompt)
    if check_ablations(ablations) == 0 or not units or not answer.token_ids:
        return None
    masks = choose_masks(len(units), ablations, prompt.text + "\x00" + answer.text)
    logit_probs, passes = _measured_masks(model, run, masks, len(prompt.doc_sources), known, spans)
    return AblationEvidence(masks, logit_probs, passes)


def _measured_masks(
    model: Any,
    run: Captured,
    masks: torch.Tensor,
    num_documents: int,
    known_evidence: GroundednessEvidence | None,
    spans: list[tuple[int, int]],
) -> tuple[torch.Tensor, int]:
    """`[masks, answer tokens]` logit-probs of the masks (over documents, then earlier turns) and the number of
    passes run for them; masks already answered are reused."""
    known: dict[tuple[bool, ...], torch.Tensor] = {}
    units, turns = masks.shape[1], masks.shape[1] - num_documents
    if run.answer_logit_probs is not None:
        known[(True,) * units] = run.answer_logit_probs
    if known_evidence is not None and known_evidence.documents_removed is not None:
        known[(False,) * num_documents + (True,) * turns] = known_evidence.documents_removed
    if known_evidence is not None and known_evidence.turns_removed is not None and turns:
        known[(True,) * num_documents + (False,) * turns] = known_evidence.turns_removed
    rows = [tuple(bool(b) for b in m) for m in masks.tolist()]
    todo = [i for i, m in enumerate(rows) if m not in known]
    out = torch.empty(masks.shape[0], len(run.answer.token_ids))
    if todo:
        ids = run.prompt.input_ids + run.answer.token_ids
        with model_lock(model):
            out[todo] = ablated_answer_logit_probs(
                model, ids, len(run.answer.token_ids), spans, masks[todo], batch_size=ABLATION_BATCH_SIZE
            )
    for i, m in enumerate(rows):
        if m in known:
            out[i] = known[m]
    return out, len(todo)
