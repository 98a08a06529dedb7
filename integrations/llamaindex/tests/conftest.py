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
    """The test corpus: one Document per file, id = file stem (see `load_folder`)."""
    from llama_index.postprocessor.at2 import load_folder

    return load_folder(directory, extensions=(".txt",))


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
