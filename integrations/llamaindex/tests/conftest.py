"""Shared fixtures: the real embedded model (loaded once), a real corpus, real retrievers. No mocks.

The tests run with sockets disabled (pytest-socket, see `addopts` in ../pyproject.toml): nothing may touch the
network.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from llama_index.core.base.llms.types import CompletionResponse, CompletionResponseGen, LLMMetadata
from llama_index.core.bridge.pydantic import Field
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

# On a machine shared with other jobs, torch's OpenMP barriers stall whenever a sibling thread is descheduled
# (measured: 8 new tokens took ~11 s with 2 threads under load, ~0.9 s with 1): set AT2_TEST_THREADS=1 there.
# CI has the machine to itself and keeps torch's default.
if os.environ.get("AT2_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["AT2_TEST_THREADS"]))

CORPUS_DIR = Path(__file__).parent / "data" / "corpus"

# The offline helpers (MiniLM embeddings, local Settings, the folder loader) are the ones
# examples/llamaindex_rag.py uses: the tests exercise exactly what a reader of the example runs.
ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
PENICILLIN = "Who discovered penicillin?"


def load_corpus(directory: Path = CORPUS_DIR):
    """The test corpus: one Document per file, id = file stem (see `load_folder`)."""
    from examples.llamaindex_rag import load_folder

    return load_folder(directory, extensions=(".txt",))


@pytest.fixture(scope="session")
def attributor():
    from at2_rag import get_attributor

    return get_attributor()


@pytest.fixture(scope="session")
def local_settings(attributor):
    """Settings.llm / embed_model / tokenizer pointed at local components (never OpenAI or tiktoken)."""
    from examples.llamaindex_rag import use_local_settings

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


_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "a an and are as at be by did do does for from has have he her his how in is it its of on or she the their "
    "they this to was were what when where which who whom why with".split()
)


def _words(text: str) -> set:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP and len(w) > 2}


class ExtractiveLLM(CustomLLM):
    """A real llama-index-core LLM that is *not* the AT2 model: it answers with the one sentence of its prompt's
    context that shares the most words with the question (the prompt's last line with a "?"), deterministically.
    It records every prompt it was given (`prompts`), as text. `chat_model=True` makes it a chat model:
    LlamaIndex then sends it messages (`CustomLLM.chat` renders them with `messages_to_prompt` and calls
    `complete`)."""

    prompts: list[str] = Field(default_factory=list)
    chat_model: bool = False

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=8192, num_output=64, model_name="extractive", is_chat_model=self.chat_model)

    @staticmethod
    def answer_for(prompt: str) -> str:
        lines = [line for line in prompt.splitlines() if line.strip()]
        questions = [line for line in lines if "?" in line]
        question = _words(questions[-1]) if questions else set()
        sentences = [s.strip() for line in lines if "?" not in line for s in re.split(r"(?<=[.!])\s+", line)]
        sentences = [s for s in sentences if len(s.split()) >= 5 and ":" not in s[:12]]
        if not sentences:
            return "I do not know."
        return max(sentences, key=lambda s: (len(_words(s) & question), -sentences.index(s)))

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self.prompts.append(prompt)
        return CompletionResponse(text=self.answer_for(prompt))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        self.prompts.append(prompt)
        answer = self.answer_for(prompt)

        def gen() -> CompletionResponseGen:
            so_far = ""
            for word in re.findall(r"\S+\s*", answer):
                so_far += word
                yield CompletionResponse(text=so_far, delta=word)

        return gen()


class Recorder(BaseEventHandler):
    """Keeps every instrumentation event (a test's own handler on the root dispatcher)."""

    events: list[Any] = []

    def handle(self, event: Any, **kwargs: Any) -> None:
        self.events.append(event)

    def of(self, cls: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]


@pytest.fixture()
def recorder():
    """A Recorder on the root dispatcher for the test's duration."""
    rec = Recorder(events=[])
    root = get_dispatcher()
    root.add_event_handler(rec)
    yield rec
    root.event_handlers = [h for h in root.event_handlers if h is not rec]
