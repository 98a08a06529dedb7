"""AT2 attribution for LlamaIndex: which retrieved nodes did the answer actually use?

- `AT2NodePostprocessor`: re-rank or prune retrieved nodes by how much the local model's answer uses them.
- `AT2CitationQueryEngine`: retrieve, answer with the local model, and cite per answer sentence.
- `AT2LLM`: the attributed model as a LlamaIndex LLM.
- `instrument_at2()` / `AT2Instrumentation`: attribute the answer of any query engine or chat engine, whatever its
  LLM.
- `AT2AttributionStartEvent` / `AT2AttributionEndEvent`: instrumentation events around every attribution.

Offline helpers for running LlamaIndex without OpenAI (all-MiniLM-L6-v2 embeddings, `Settings` pointed at the
local components, a folder loader) are in the repository's `examples/llamaindex_rag.py`, not in this package.
"""

from ._version import __version__
from .base import AT2NodePostprocessor
from .events import AT2AttributionEndEvent, AT2AttributionStartEvent
from .instrumentation import AT2Instrumentation, instrument_at2
from .llm import AT2LLM
from .query_engine import AT2CitationQueryEngine

__all__ = [
    "AT2AttributionEndEvent",
    "AT2AttributionStartEvent",
    "AT2CitationQueryEngine",
    "AT2Instrumentation",
    "AT2LLM",
    "AT2NodePostprocessor",
    "__version__",
    "instrument_at2",
]
