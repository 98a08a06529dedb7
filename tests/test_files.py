"""Atomic writes: a finished file is complete and readable by others; a failed write leaves nothing behind."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from at2_rag.storage.files import atomic_path


def test_finished_file_is_complete_and_world_readable(tmp_path):
    target = tmp_path / "shard.safetensors"
    with atomic_path(target) as tmp:
        save_file({"x": torch.arange(3)}, str(tmp))  # safetensors recreates the file with mode 0600
        assert not target.exists()  # nothing visible before the write finished
    assert torch.equal(load_file(str(target))["x"], torch.arange(3))
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["shard.safetensors"]


def test_failed_write_keeps_the_old_file_and_leaves_no_debris(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as tmp:
            tmp.write_text("half a repo")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
