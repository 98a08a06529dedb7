"""Examples in, shards out: the on-disk format of collected training data (safetensors, no pickles).

A shard holds several examples. Tensors are keyed `"{k}.features"` ([targets, sources, L*H]),
`"{k}.masks"` ([masks, sources], 1 = kept) and `"{k}.labels"` ([targets, masks], log-odds), plus
`"{k}.full"` ([targets], log-odds with nothing ablated); the shard's metadata holds a JSON list describing
each example (id, query, answer, targets, source ids). Shards are written to a temp file and renamed, so a
shard on disk is always complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import InvalidInputError
from ..files import atomic_path

SHARD_GLOB = "shard-*.safetensors"


@dataclass
class Example:
    """One RAG example to collect: a question and its retrieved documents."""

    id: str
    query: str
    documents: list[Any]
    history: list[Any] = field(default_factory=list)


@dataclass
class CollectedExample:
    id: str
    features: torch.Tensor  # [targets, sources, L*H]
    masks: torch.Tensor  # [masks, sources] bool, True = kept
    labels: torch.Tensor  # [targets, masks]
    full: torch.Tensor  # [targets]
    meta: dict[str, Any]


def read_examples(source: str | os.PathLike[str] | Iterable[Any]) -> list[Example]:
    """Examples from a JSONL file (query, documents, optional id/history) or an iterable of dicts/Examples."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InvalidInputError(f"{path} is not a file of examples (JSONL)")
        rows: Iterable[Any] = []
        lines = path.read_text(encoding="utf-8").splitlines()
        parsed = []
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    parsed.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InvalidInputError(f"{path}:{n} is not valid JSON: {exc}") from exc
        rows = parsed
    else:
        rows = source
    examples = []
    for i, row in enumerate(rows):
        if isinstance(row, Example):
            examples.append(row)
            continue
        if not isinstance(row, dict) or "query" not in row or "documents" not in row:
            raise InvalidInputError(f"example {i} needs 'query' and 'documents'")
        examples.append(
            Example(id=str(row.get("id", i)), query=row["query"], documents=row["documents"], history=row.get("history") or [])
        )
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise InvalidInputError("example ids must be unique")
    return examples


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


def shard_example_meta(path: Path) -> list[dict[str, Any]]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("examples", "[]"))


def read_shard(path: Path) -> Iterator[CollectedExample]:
    with safe_open(str(path), framework="pt") as f:
        metas = json.loads((f.metadata() or {}).get("examples", "[]"))
        for k, meta in enumerate(metas):
            yield CollectedExample(
                id=meta["id"],
                features=f.get_tensor(f"{k}.features"),
                masks=f.get_tensor(f"{k}.masks").bool(),
                labels=f.get_tensor(f"{k}.labels"),
                full=f.get_tensor(f"{k}.full"),
                meta=meta,
            )


def shard_paths(folder: str | os.PathLike[str]) -> list[Path]:
    return sorted(Path(folder).glob(SHARD_GLOB))


def completed_ids(folder: str | os.PathLike[str]) -> set[str]:
    return {m["id"] for p in shard_paths(folder) for m in shard_example_meta(p)}


def load_collected(folder: str | os.PathLike[str]) -> list[CollectedExample]:
    """Every collected example in a folder, in a stable order (by example id), without duplicates."""
    seen: dict[str, CollectedExample] = {}
    for path in shard_paths(folder):
        for ex in read_shard(path):
            seen.setdefault(ex.id, ex)
    return [seen[k] for k in sorted(seen)]
