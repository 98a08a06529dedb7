"""The shared Attributors of a process: one loaded model per (model, estimator, device, dtype), whoever asks.

Loading takes seconds and hundreds of MB, so the LangChain and LlamaIndex adapters, the chatbot and user code
all ask here: using both adapters in one process loads the embedded model once.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from ..attributor import Attributor
from ..models import DEFAULT_MODEL_ID

#: names that select the embedded SmolLM2-135M-Instruct (its GGUF from `at2-rag download-model`, loaded offline)
DEFAULT_MODEL_NAMES = frozenset({"default", DEFAULT_MODEL_ID, DEFAULT_MODEL_ID.split("/")[-1]})

_CACHE: dict[tuple[Any, ...], Attributor] = {}
_LOCK = threading.Lock()


def is_default_model(model_name: str | os.PathLike[str] | None) -> bool:
    return model_name is None or str(model_name) in DEFAULT_MODEL_NAMES


def _estimator_key(estimator: Any) -> Any:
    """Paths and Hub ids by value; an estimator object by identity (two equal-looking objects may differ)."""
    if estimator is None or isinstance(estimator, (str, os.PathLike)):
        return None if estimator is None else os.fspath(estimator)
    return ("object", id(estimator))


def get_attributor(
    model_name: str | os.PathLike[str] | None = None,
    *,
    estimator: Any = None,
    device: str | None = None,
    dtype: str | None = None,
) -> Attributor:
    """The process's Attributor for `model_name` (a local folder or Hub id; None or "default" = the embedded
    SmolLM2-135M-Instruct), loaded on first use under a lock so concurrent first calls load once."""
    name = DEFAULT_MODEL_ID if is_default_model(model_name) else os.fspath(model_name)  # type: ignore[arg-type]
    key = (name, _estimator_key(estimator),
           None if device is None else str(device), None if dtype is None else str(dtype))
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    with _LOCK:
        cached = _CACHE.get(key)
        if cached is None:
            if name == DEFAULT_MODEL_ID:
                from ..models import load_default_model

                model, tokenizer = load_default_model(device=device)
                cached = Attributor(model, tokenizer, estimator=estimator)
            else:
                cached = Attributor.from_pretrained(name, estimator=estimator, device=device, dtype=dtype)
            _CACHE[key] = cached
        return cached


def default_attributor() -> Attributor:
    """The embedded model with its shipped estimator: `get_attributor()`."""
    return get_attributor()


def clear_shared_attributors() -> None:
    """Forget every shared Attributor (a model is freed once nothing else holds it)."""
    with _LOCK:
        _CACHE.clear()
        batchers = list(_BATCHERS.values())
        _BATCHERS.clear()
    for batcher in batchers:
        batcher.close()


_BATCHERS: dict[int, Any] = {}


def get_micro_batcher(attributor: Attributor | None = None) -> Any:
    """The process's MicroBatcher for `attributor` (default: the shared default Attributor): every adapter's
    concurrent and async callers of one model share its batches."""
    from .batching import MicroBatcher

    attributor = attributor if attributor is not None else get_attributor()
    with _LOCK:
        batcher = _BATCHERS.get(id(attributor))
        if batcher is None or batcher.attributor is not attributor:
            batcher = _BATCHERS[id(attributor)] = MicroBatcher(attributor)
        return batcher
