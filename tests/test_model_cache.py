"""The embedded model's converted-weights cache: converted once, safe when several processes start cold."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

_LOAD = (
    "import logging, sys; logging.basicConfig(level=logging.WARNING, stream=sys.stdout); "
    "from at2_rag.models import load_default_model; m, t = load_default_model(); "
    "print('LOADED', m.config.num_hidden_layers)"
)


def test_cold_cache_shared_by_two_processes(tmp_path):
    """Two processes starting together on an empty cache (as `torchrun --nproc_per_node 2` does) both load the
    model, and the GGUF is converted exactly once (before the lock, the second converter replaced the folder
    while the first was reading it)."""
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
