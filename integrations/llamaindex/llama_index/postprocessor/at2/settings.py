"""One call to point LlamaIndex's global Settings at local, offline components."""

from __future__ import annotations

import functools
from typing import Any

from ._common import default_attributor


def use_local_settings(attributor: Any = None, embed_model: Any = "minilm", llm: Any = "at2") -> Any:
    """Set `Settings.llm` (an `AT2LLM` over the attributor's model), `Settings.embed_model` (the packaged
    all-MiniLM-L6-v2, `MiniLMEmbedding`) and `Settings.tokenizer` (the model's own Hugging Face tokenizer).

    LlamaIndex otherwise defaults to OpenAI for the LLM and the embeddings, and to tiktoken for counting tokens;
    after this call nothing in the standard index -> retriever -> synthesizer flow needs the network.
    Pass `embed_model=None` / `llm=None` to leave those settings alone, or your own objects to use them.
    Returns the attributor.
    """
    from llama_index.core import Settings

    attributor = attributor if attributor is not None else default_attributor()
    if llm == "at2":
        from .llm import AT2LLM

        llm = AT2LLM(attributor)
    if llm is not None:
        Settings.llm = llm
    if embed_model == "minilm":
        from .embeddings import MiniLMEmbedding

        embed_model = MiniLMEmbedding()
    if embed_model is not None:
        Settings.embed_model = embed_model
    Settings.tokenizer = functools.partial(attributor.tokenizer.encode, add_special_tokens=False)
    return attributor
