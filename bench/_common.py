"""Helpers shared by the benchmarks in bench/ (imported as `_common` by a script run as `python bench/X.py`, whose
folder is then first on the import path): the real passages and the earlier exchange the timing benchmarks use."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "rag_python_docs" / "train.jsonl"


def conversation_history() -> list[dict[str, str]]:
    """An earlier exchange from the data set: another example's question and, as the answer, its first passage's
    opening sentences (about 60 tokens in all)."""
    row = json.loads(DATA.read_text().splitlines()[1])
    answer = " ".join(row["documents"][0]["text"].split(". ")[:2]).strip()
    return [{"role": "user", "content": row["query"]}, {"role": "assistant", "content": answer}]


def documents_for(tokenizer, target_tokens: int) -> tuple[str, list[dict]]:
    """Real passages from the python-docs set, added until the prompt reaches about `target_tokens`."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    docs, total, seen = [], 0, set()
    for row in rows:
        for d in row["documents"]:
            if d["id"] in seen:
                continue
            seen.add(d["id"])
            n = len(tokenizer(d["text"], add_special_tokens=False)["input_ids"]) + 8
            if total + n > target_tokens - 60:
                return rows[0]["query"], docs or [d]
            docs.append(d)
            total += n
    return rows[0]["query"], docs
