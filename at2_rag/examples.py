"""RAG examples in: the JSONL format (id, query, documents, optional history) that collection, evaluation and the
data-preparation scripts share, checked line by line so every message names the line and id."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import InputFileError, InvalidExamplesError, InvalidInputError, NoDocumentsError
from .prompting.sources import normalize_documents
from .storage.files import json_type, read_jsonl

logger = logging.getLogger(__name__)


def example_seed(seed: int, example_id: str) -> int:
    """A per-example seed that does not depend on order or process count (collection and evaluation draw their
    ablation masks from it)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{example_id}".encode()).digest()[:8], "little") & (2**63 - 1)


def example_digest(example: Example) -> str:
    """Of an example's question, documents and history: what a cached measurement of it is checked against, so
    one is reused only for the same content, not just the same id (a regenerated file, ids that are line numbers)."""
    content = json.dumps([example.query, example.documents, example.history], sort_keys=True, default=str)
    return hashlib.sha256(content.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass
class Example:
    """One RAG example to collect: a question and its retrieved documents.

    `line` (1-based, in the JSONL file) and `position` (among the examples, 0-based) say where it came from,
    so that every message about it can name it."""

    id: str
    query: str
    documents: list[Any]
    history: list[Any] = field(default_factory=list)
    line: int | None = field(default=None, compare=False)
    position: int | None = field(default=None, compare=False)

    def describe(self) -> str:
        return _describe(self.line, self.position, self.id)


@dataclass(frozen=True)
class InvalidExample:
    """An example that cannot be collected or evaluated, and why (kept in summaries and in the error)."""

    line: int | None  # 1-based line of the JSONL file, None for examples given in memory
    position: int  # 0-based among the examples (non-blank lines)
    id: str | None  # None when the line has no readable id (not JSON, not an object)
    reason: str

    def describe(self) -> str:
        return f"{_describe(self.line, self.position, self.id)}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "position": self.position, "id": self.id, "reason": self.reason}


def _describe(line: int | None, position: int | None, example_id: str | None) -> str:
    where = f"line {line}" if line is not None else f"example {position}"
    return where if example_id is None else f"{where} (id {example_id!r})"


@dataclass
class ScannedExamples:
    """The outcome of reading examples: the good ones, the bad ones with reasons, and where they came from."""

    examples: list[Example]
    invalid: list[InvalidExample]
    source: str

    def error(self, hint: str = "") -> InvalidExamplesError:
        return InvalidExamplesError(self.source, self.invalid, hint)


def _example_problem(row: dict[str, Any]) -> str | None:
    """Why a parsed row is not a usable example (checks that need no tokenizer), or None."""
    missing = [k for k in ("query", "documents") if k not in row]
    if missing:
        return f"needs 'query' and 'documents' (missing {', '.join(repr(k) for k in missing)}; has {sorted(row)})"
    query = row["query"]
    if not isinstance(query, str):
        return f"query must be a string, got {json_type(query)}"
    if not query.strip():
        return "query is empty"
    history = row.get("history")
    if history is not None and not isinstance(history, (list, tuple)):
        return f"history must be a list of earlier turns, got {json_type(history)}"
    try:
        normalize_documents(row["documents"])
    except (InvalidInputError, NoDocumentsError) as exc:
        return str(exc)
    return None


def _example_id(row: dict[str, Any], position: int) -> tuple[str | None, str | None]:
    """(id, problem): a missing or null id is the example's position, as it always was (shards are keyed by it)."""
    value = row.get("id")
    if value is None:
        return str(position), None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"id must be a string or an integer, got {json_type(value)}"
    if isinstance(value, str) and not value.strip():
        return None, "id is empty"
    return str(value), None


def scan_examples(source: str | os.PathLike[str] | Iterable[Any], limit: int | None = None) -> ScannedExamples:
    """Read and check every example (the first `limit` only, when given) without stopping at the first bad one.

    A file that cannot be read as JSON Lines at all (missing, binary, a folder) raises `InputFileError`; a bad
    line or example (not UTF-8, not JSON, not an object, no documents, empty query, duplicate id, ...) is listed
    in `invalid` with its line and id."""
    rows: list[tuple[int | None, Any, str | None]]  # (line, value, problem)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise InputFileError(f"{path} is a folder, not a file of examples (JSONL)", path)
        rows = [(r.line, r.value, r.problem) for r in read_jsonl(path, "file of examples (JSONL)")]
        where = str(path)
    else:
        rows = [(None, row, None) for row in source]
        where = "the examples given"
    if limit is not None:
        rows = rows[: max(limit, 0)]
    examples: list[Example] = []
    invalid: list[InvalidExample] = []
    first_seen: dict[str, Example] = {}
    for position, (line, row, problem) in enumerate(rows):
        example_id: str | None = None
        if problem is None and isinstance(row, Example):
            # an Example read earlier keeps its place in its file (the rank split and messages use it)
            example = replace(row, line=row.line if line is None else line,
                              position=position if row.position is None else row.position)
            example_id = example.id
            problem = _example_problem(
                {"query": example.query, "documents": example.documents, "history": example.history or None}
            )
        elif problem is None and not isinstance(row, dict):
            problem = f"is {json_type(row)}, not an object with 'query' and 'documents'"
        elif problem is None:
            example_id, problem = _example_id(row, position)
            problem = problem or _example_problem(row)
            if problem is None:
                assert example_id is not None  # _example_id gives an id whenever it reports no problem
                example = Example(
                    id=example_id, query=row["query"], documents=row["documents"], history=row.get("history") or [],
                    line=line, position=position,
                )
        if problem is None and example_id in first_seen:
            earlier = first_seen[example_id]
            first = _describe(earlier.line, earlier.position, None)
            problem = f"id {example_id!r} is already used by {first}; ids must be unique"
        if problem is not None:
            if isinstance(row, Example):
                line, position = example.line, example.position or 0
            invalid.append(InvalidExample(line, position, example_id, problem))
            continue
        first_seen[example.id] = example
        examples.append(example)
    return ScannedExamples(examples, invalid, where)


def read_examples(
    source: str | os.PathLike[str] | Iterable[Any], skip_invalid: bool = False, limit: int | None = None
) -> list[Example]:
    """Examples from a JSONL file (query, documents, optional id/history) or an iterable of dicts/Examples.

    Every example is checked first: bad ones raise one `InvalidExamplesError` naming each (line and id), or, with
    `skip_invalid`, are logged and left out."""
    scanned = scan_examples(source, limit)
    if scanned.invalid and not skip_invalid:
        raise scanned.error("fix them (or pass skip_invalid=True to leave them out)")
    for problem in scanned.invalid:
        logger.warning("skipping invalid example in %s: %s", scanned.source, problem.describe())
    return scanned.examples
