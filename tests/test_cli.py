"""The `at2-rag` command line on the real embedded model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from at2_rag.cli import read_documents
from at2_rag.errors import InvalidInputError
from at2_rag.models import load_model

ROOT = Path(__file__).resolve().parents[1]


def at2(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "at2_rag.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_demo_prints_cited_answer_and_ranked_documents_as_json():
    done = at2("demo", "--json", "--max-new-tokens", "24")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["answer"].strip()
    assert len(result["documents"]) == 4
    assert {d["id"] for d in result["documents"]} <= {
        "aurora-x2-specs", "aurora-x1-specs", "returns-policy", "shipping", "nova-speaker"}
    assert result["citations"] and all(result["answer"][c["start"]:c["end"]] == c["text"] for c in result["citations"])


def test_demo_table_and_plot(tmp_path):
    png = tmp_path / "demo.png"
    done = at2("demo", "--max-new-tokens", "16", "--plot", str(png))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Documents ranked by attribution" in done.stdout and "Q:" in done.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_attribute_a_folder_with_a_given_answer(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "volcano.md").write_text("Mount Etna is an active volcano on Sicily. It last erupted in 2023.")
    (folder / "bread.txt").write_text("Sourdough bread rises thanks to wild yeast and lactic acid bacteria.")
    (folder / "ignored.csv").write_text("a,b")
    done = at2("attribute", "--query", "Where is Mount Etna?", "--documents", str(folder),
               "--answer", "Mount Etna is on Sicily.", "--json", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["answer"] == "Mount Etna is on Sicily."
    scores = {d["id"]: d["score"] for d in result["documents"]}
    assert set(scores) == {"bread.txt", "volcano.md"}
    assert scores["volcano.md"] > scores["bread.txt"]


def test_device_is_checked_before_the_model_loads(tmp_path):
    """--device names a device torch has here, or the command stops at once (argparse's exit 2), saying why."""
    done = at2("demo", "--device", "nonsense", timeout=60)
    assert done.returncode == 2 and "'nonsense' is not a torch device" in done.stderr, done.stderr
    if not torch.cuda.is_available():
        done = at2("evaluate", str(tmp_path / "examples.jsonl"), "--device", "cuda:1", timeout=60)
        assert done.returncode == 2 and "has no cuda device here" in done.stderr, done.stderr
        with pytest.raises(InvalidInputError, match="has no cuda device"):
            load_model(tmp_path, device="cuda")  # the API says it too, before reading any file


def test_attribute_reports_bad_input_clearly(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = at2("attribute", "--query", "q", "--documents", str(empty))
    assert done.returncode == 2 and "contains no .txt or .md files" in done.stderr
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    done = at2("attribute", "--query", "q", "--documents", str(bad))
    assert done.returncode == 2 and "docs.jsonl:2 is not valid JSON" in done.stderr


def test_read_documents_jsonl_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "a", "text": "x", "title": "T"}\n\n"plain string"\n{"page_content": "lc style"}\n')
    docs = read_documents(path)
    assert [d.get("id") for d in docs] == ["a", None, None] and docs[1]["text"] == "plain string"
    path.write_text('{"title": "no text"}\n')
    with pytest.raises(InvalidInputError, match="needs a string field 'text'"):
        read_documents(path)
    with pytest.raises(InvalidInputError, match="neither a JSONL file nor a folder"):
        read_documents(tmp_path / "missing.jsonl")
    undecodable = tmp_path / "bin"
    undecodable.mkdir()
    (undecodable / "x.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InvalidInputError, match="cannot read"):
        read_documents(undecodable)
