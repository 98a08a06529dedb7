"""Shared fixtures: the real embedded model (loaded once), a real corpus, real retrievers. No mocks.

The tests run with sockets disabled (pytest-socket, see `addopts` in ../pyproject.toml): nothing may touch the
network.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# On a machine shared with other jobs, torch's OpenMP barriers stall whenever a sibling thread is descheduled
# (measured: 8 new tokens took ~11 s with 2 threads under load, ~0.9 s with 1): set AT2_TEST_THREADS=1 there.
# CI has the machine to itself and keeps torch's default.
if os.environ.get("AT2_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["AT2_TEST_THREADS"]))

CORPUS_DIR = Path(__file__).parent / "data" / "corpus"
PENICILLIN = "Who discovered penicillin?"


def load_corpus(directory: Path = CORPUS_DIR):
    """One LlamaIndex Document per file, with a stable id (the file stem) and a title."""
    from llama_index.core import SimpleDirectoryReader

    docs = SimpleDirectoryReader(input_dir=str(directory), required_exts=[".txt"]).load_data()
    for doc in docs:
        stem = Path(doc.metadata["file_name"]).stem
        doc.id_ = stem
        doc.metadata["title"] = stem.replace("_", " ").title()
        for keys in (doc.excluded_llm_metadata_keys, doc.excluded_embed_metadata_keys):
            if "file_path" not in keys:
                keys.append("file_path")
    return sorted(docs, key=lambda d: d.id_)


@pytest.fixture(scope="session")
def attributor():
    from llama_index.postprocessor.at2 import default_attributor

    return default_attributor()


@pytest.fixture(scope="session")
def local_settings(attributor):
    """Settings.llm / embed_model / tokenizer pointed at local components (never OpenAI or tiktoken)."""
    from llama_index.postprocessor.at2 import use_local_settings

    use_local_settings(attributor)
    return attributor


@pytest.fixture(scope="session")
def nodes(local_settings):
    from llama_index.core.node_parser import SentenceSplitter

    splitter = SentenceSplitter(chunk_size=256, chunk_overlap=0, id_func=lambda i, doc: f"{doc.node_id}-{i}")
    return splitter.get_nodes_from_documents(load_corpus())


@pytest.fixture(scope="session")
def node_text(nodes):
    from llama_index.core.schema import MetadataMode

    return {n.node_id: n.get_content(metadata_mode=MetadataMode.NONE) for n in nodes}


@pytest.fixture(scope="session")
def vector_index(nodes):
    from llama_index.core import VectorStoreIndex

    return VectorStoreIndex(nodes)  # Settings.embed_model = MiniLMEmbedding


@pytest.fixture(scope="session")
def bm25(nodes):
    from llama_index.retrievers.bm25 import BM25Retriever

    return BM25Retriever.from_defaults(nodes=nodes, similarity_top_k=4)
