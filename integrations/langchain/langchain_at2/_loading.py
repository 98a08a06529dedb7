"""The shared Attributors come from the core (`at2_rag.get_attributor`): one loaded model per process, shared with
the LlamaIndex package, the chatbot and user code. Re-exported here under the names this package always had."""

from __future__ import annotations

from at2_rag.serving.shared import DEFAULT_MODEL_NAMES, get_attributor, is_default_model
from at2_rag.serving.shared import clear_shared_attributors as clear_cache

__all__ = ["DEFAULT_MODEL_NAMES", "clear_cache", "get_attributor", "is_default_model"]
