"""Load a folder of text files as LlamaIndex Documents whose ids survive re-indexing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def load_folder(directory: str | Path, extensions: Sequence[str] = (".txt", ".md")) -> list[Any]:
    """One Document per file: id = file stem and a readable title, so attribution scores and citations keep
    pointing at the same node ids across runs; machine paths stay out of what the LLM and embedder read."""
    from llama_index.core import SimpleDirectoryReader

    docs = SimpleDirectoryReader(input_dir=str(directory), required_exts=list(extensions)).load_data()
    for doc in docs:
        stem = Path(doc.metadata["file_name"]).stem
        doc.id_ = stem
        doc.metadata["title"] = stem.replace("_", " ").title()
        for keys in (doc.excluded_llm_metadata_keys, doc.excluded_embed_metadata_keys):
            if "file_path" not in keys:
                keys.append("file_path")
    return sorted(docs, key=lambda d: d.id_)
