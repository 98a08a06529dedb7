"""Shards out: the on-disk format of collected training data (safetensors, no pickles). Examples in are read by
`at2_rag.examples` (shared with evaluation); its names are re-exported here.

A shard holds several examples. Tensors are keyed `"{k}.features"` ([targets, sources, L*H]),
`"{k}.masks"` ([masks, sources], 1 = kept) and `"{k}.labels"` ([targets, masks], log-odds), plus
`"{k}.full"` ([targets], log-odds with nothing ablated); the shard's metadata holds a JSON list describing
each example (id, query, answer, targets, source ids). Shards are written to a temp file and renamed, so a
shard on disk is always complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import InputFileError, InvalidInputError
from ..examples import Example, InvalidExample, ScannedExamples, read_examples, scan_examples
from ..storage.files import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "SHARD_GLOB", "TEMP_SHARD_GLOB", "CollectedExample", "Example", "InvalidExample", "ScannedExamples",
    "completed_ids", "load_collected", "read_examples", "read_shard", "remove_stale_temp_shards", "scan_examples",
    "shard_example_meta", "shard_paths", "write_shard",
]

SHARD_GLOB = "shard-*.safetensors"
TEMP_SHARD_GLOB = ".shard-*.tmp"  # atomic_path's temp file beside a shard being written
_TEMP_SHARD_RANK = re.compile(r"^\.shard-r(\d+)-")


@dataclass
class CollectedExample:
    id: str
    features: torch.Tensor  # [targets, sources, L*H]
    masks: torch.Tensor  # [masks, sources] bool, True = kept
    labels: torch.Tensor  # [targets, masks]
    full: torch.Tensor  # [targets]
    meta: dict[str, Any]


MASK_KINDS = ("random", "leave_one_out", "no_documents")


def mask_kinds(example: CollectedExample) -> list[str]:
    """What each of the example's masks is: `random` (trained on with the correlation objective),
    `leave_one_out` (one source removed alone) or `no_documents` (every document removed, for groundedness).
    Shards written before kinds were recorded hold random masks and, from `--sources context`, a last
    no-documents mask named by `meta["no_documents_mask"]`."""
    kinds = example.meta.get("mask_kinds")
    if kinds is not None:
        return list(kinds)
    no_documents = example.meta.get("no_documents_mask")
    return ["no_documents" if i == no_documents else "random" for i in range(example.masks.shape[0])]


def merge_collected(
    sets: Sequence[Sequence[CollectedExample]], names: Sequence[str] | None = None
) -> list[list[CollectedExample]]:
    """Add to each example the masks that later sets hold for the same example id (e.g. `collect --num-masks 0
    --leave-one-out` run over examples collected with random masks before): the merged example stays in the
    first set that has it, so the sets and their splits are unchanged, and a set left empty is dropped.
    The copies must be of the same answer over the same sources, else the labels would not describe the
    features: an `InvalidInputError` names the set and the example."""
    names = list(names) if names is not None else [f"set {i}" for i in range(len(sets))]
    first: dict[str, tuple[int, int]] = {}
    merged: list[list[CollectedExample]] = []
    for s, group in enumerate(sets):
        kept: list[CollectedExample] = []
        for ex in group:
            if ex.id not in first:
                first[ex.id] = (s, len(kept))
                kept.append(ex)
                continue
            i, j = first[ex.id]
            if i == s:
                continue  # a duplicate within one set: the first is kept, as load_collected does
            base = merged[i][j]
            for key in ("answer", "source_ids", "targets"):
                if base.meta.get(key) != ex.meta.get(key):
                    raise InvalidInputError(
                        f"example {ex.id!r} in {names[s]} has another {key} than in {names[i]}: masks can only be "
                        "added to the same answer over the same sources (collect both with the same model, "
                        "--sources and --max-new-tokens)"
                    )
            merged[i][j] = CollectedExample(
                id=base.id,
                features=base.features,
                masks=torch.cat([base.masks, ex.masks]),
                labels=torch.cat([base.labels, ex.labels], dim=1),
                full=base.full,
                meta={**base.meta, "mask_kinds": mask_kinds(base) + mask_kinds(ex)},
            )
        merged.append(kept)
    return [group for group in merged if group]


def write_shard(path: Path, examples: list[CollectedExample]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for k, ex in enumerate(examples):
        tensors[f"{k}.features"] = ex.features.float().contiguous()
        tensors[f"{k}.masks"] = ex.masks.to(torch.uint8).contiguous()
        tensors[f"{k}.labels"] = ex.labels.float().contiguous()
        tensors[f"{k}.full"] = ex.full.float().contiguous()
    meta = {"examples": json.dumps([ex.meta for ex in examples]), "format": "at2-rag-shard-v1"}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


_SHARD_HINT = "delete it and rerun `collect` to redo its examples"


def shard_example_meta(path: Path) -> list[dict[str, Any]]:
    """The example descriptions a shard holds; a damaged or foreign file is an `InputFileError` naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metas = json.loads((f.metadata() or {}).get("examples", "[]"))
    except (SafetensorError, OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise InputFileError(f"{path} is not a readable at2-rag shard ({exc}); {_SHARD_HINT}", path) from exc
    if not isinstance(metas, list) or not all(isinstance(m, dict) and "id" in m for m in metas):
        raise InputFileError(f"{path} is not an at2-rag shard (its metadata lists no example ids); {_SHARD_HINT}", path)
    return metas


def read_shard(path: Path) -> Iterator[CollectedExample]:
    metas = shard_example_meta(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            items = [
                CollectedExample(
                    id=meta["id"],
                    features=f.get_tensor(f"{k}.features"),
                    masks=f.get_tensor(f"{k}.masks").bool(),
                    labels=f.get_tensor(f"{k}.labels"),
                    full=f.get_tensor(f"{k}.full"),
                    meta=meta,
                )
                for k, meta in enumerate(metas)
            ]
    except (SafetensorError, OSError, ValueError) as exc:  # a tensor missing or unreadable
        raise InputFileError(f"{path} is not a readable at2-rag shard ({exc}); {_SHARD_HINT}", path) from exc
    yield from items


def shard_paths(folder: str | os.PathLike[str]) -> list[Path]:
    return sorted(Path(folder).glob(SHARD_GLOB))


def completed_ids(folder: str | os.PathLike[str]) -> set[str]:
    return {m["id"] for p in shard_paths(folder) for m in shard_example_meta(p)}


def remove_stale_temp_shards(folder: str | os.PathLike[str], rank: int = 0, world_size: int = 1) -> list[Path]:
    """Delete the temp shards (`.shard-*.tmp`) that killed writers left in `folder`.

    Only this rank's, and those of ranks this run does not have: another rank of this run may be writing its
    own right now. Without a rank in the name, rank 0 removes it."""
    removed = []
    for path in Path(folder).glob(TEMP_SHARD_GLOB):
        match = _TEMP_SHARD_RANK.match(path.name)
        owner = int(match.group(1)) if match else 0
        if owner == rank or owner >= world_size:
            try:
                path.unlink()
            except FileNotFoundError:  # removed meanwhile
                continue
            removed.append(path)
    if removed:
        logger.info("removed %d temp shard(s) left by a killed run in %s", len(removed), folder)
    return removed


def load_collected(folder: str | os.PathLike[str]) -> list[CollectedExample]:
    """Every collected example in a folder, in a stable order (by example id), without duplicates."""
    seen: dict[str, CollectedExample] = {}
    for path in shard_paths(folder):
        for ex in read_shard(path):
            seen.setdefault(ex.id, ex)
    return [seen[k] for k in sorted(seen)]
