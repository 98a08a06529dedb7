"""LangChain integration for at2-rag: which retrieved documents did the answer actually use?

* `ChatAT2` - a local chat model (embedded SmolLM2 by default) whose answers carry AT2 scores and standard
  `Citation` annotations;
* `AT2CallbackHandler` / `AsyncAT2CallbackHandler` - attribute the answers of existing chains;
* `AT2Citations` / `with_citations` - a post-processor for `{"answer", "context", "question"}` outputs.
"""

from . import annotations as _annotations  # registers the "at2" content translator
from ._version import __version__
from .annotations import attribution_from_metadata
from .callbacks import AsyncAT2CallbackHandler, AT2CallbackHandler, ChainAttribution
from .chat_models import ChatAT2
from .citations import AT2Citations, with_citations
from .documents import (
    document_blocks,
    documents_message,
    extract_documents,
    rag_messages,
    to_at2_document,
    to_at2_documents,
)

del _annotations

__all__ = [
    "AT2CallbackHandler",
    "AT2Citations",
    "AsyncAT2CallbackHandler",
    "ChainAttribution",
    "ChatAT2",
    "__version__",
    "attribution_from_metadata",
    "document_blocks",
    "documents_message",
    "extract_documents",
    "rag_messages",
    "to_at2_document",
    "to_at2_documents",
    "with_citations",
]
