"""The second, out-of-domain held-out set (Debian package descriptions, half of it mismatched): the committed file's
format and invariants, and the builder (scripts/build_second_domain.py) on a tiny synthetic Debian index, so that
neither needs the real Translation-en file."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

from at2_rag import AttributionRequest
from at2_rag.examples import read_examples
from at2_rag.prompting.sources import normalize_documents

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "data" / "rag_second_domain" / "heldout.jsonl"
KEYS = {"id", "query", "documents", "relevant_ids", "answer_hint", "mismatched", "question_from"}


def _load_builder():
    """scripts/build_second_domain.py is a data-preparation script outside the package: load it from its path."""
    path = ROOT / "scripts" / "build_second_domain.py"
    spec = importlib.util.spec_from_file_location("build_second_domain", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


sd = _load_builder()


def _package(doc_id: str) -> str:
    return doc_id.split("#", 1)[0]


def _check_rows(rows: list[dict]) -> None:
    """Invariants every built file keeps, the committed one and the synthetic ones alike."""
    assert rows and len(rows) % 2 == 0
    assert sum(r["mismatched"] for r in rows) == len(rows) // 2
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["query"].lower() for r in rows}) == len(rows)
    assert len({r["question_from"] for r in rows}) == len(rows)
    # every example has its own retrieval: no document set is reused
    assert len({tuple(d["id"] for d in r["documents"]) for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == KEYS, r["id"]
        assert isinstance(r["mismatched"], bool)
        assert r["query"].endswith("?") and len(r["query"].split()) >= 4
        AttributionRequest(query=r["query"], documents=r["documents"])  # the fields a request takes
        assert len(normalize_documents(r["documents"])) == len(r["documents"])
        ids = [d["id"] for d in r["documents"]]
        assert len(set(ids)) == len(ids), f"{r['id']}: duplicate document ids"
        assert 4 <= len(ids) <= 6
        assert sum(len(d["text"]) for d in r["documents"]) <= 2700
        for d in r["documents"]:
            assert set(d) == {"id", "title", "text", "url"} and all(d.values())
            assert 60 <= len(d["text"].split()) <= 150
        # one document per source package at most, as a deduplicating retriever would return
        assert len({_package(i) for i in ids}) == len(ids)
        if r["mismatched"]:
            assert r["relevant_ids"] == []
            # asked over another example's documents: nothing from the question's package, no answer sentence
            assert r["question_from"] not in ids
            assert _package(r["question_from"]) not in {_package(i) for i in ids}
            assert not any(r["answer_hint"] in d["text"] for d in r["documents"])
        else:
            assert r["relevant_ids"] == [r["question_from"]]
            docs = {d["id"]: d for d in r["documents"]}
            assert r["answer_hint"] in docs[r["question_from"]]["text"]
            # the distractors do not state the answer
            others = [d for i, d in docs.items() if i != r["question_from"]]
            assert not any(r["answer_hint"] in d["text"] for d in others)


# --------------------------------------------------------------------------------------------------------
# The committed file
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def committed() -> list[dict]:
    with HELDOUT.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_committed_file_format(committed: list[dict]) -> None:
    assert len(committed) == 80
    _check_rows(committed)
    assert [r["id"] for r in committed] == [f"heldout-{i:05d}" for i in range(80)]


def test_committed_file_loads_as_examples(committed: list[dict]) -> None:
    examples = read_examples(HELDOUT)  # raises on any line collection or evaluation could not use
    assert [e.id for e in examples] == [r["id"] for r in committed]
    assert all(e.documents and e.query for e in examples)


def test_committed_mismatched_questions_come_from_the_file(committed: list[dict]) -> None:
    """A mismatched question is one of the file's own held-out questions whose documents went to another
    mismatched example: its passage is among that example's documents (it may also be another's distractor)."""
    where: dict[str, list[dict]] = {}
    for r in committed:
        for d in r["documents"]:
            where.setdefault(d["id"], []).append(r)
    for r in committed:
        if r["mismatched"]:
            holders = [h for h in where.get(r["question_from"], []) if h["mismatched"]]
            assert holders, r["id"]
            source_doc = next(d for d in holders[0]["documents"] if d["id"] == r["question_from"])
            assert r["answer_hint"] in source_doc["text"]


def test_readme_names_the_source_and_command() -> None:
    readme = (HELDOUT.parent / "README.md").read_text(encoding="utf-8")
    assert "scripts/build_second_domain.py" in readme and "--seed 0" in readme
    assert "Translation-en" in readme and "licen" in readme.lower()


# --------------------------------------------------------------------------------------------------------
# The builder on a tiny synthetic Debian index
# --------------------------------------------------------------------------------------------------------

# 36 made-up packages, each its own source (the first two also build a -dev package): enough sources that a
# question's package is missing from most other examples' documents, as in the real index of ~10,000 sources
_NAMES = [a + b for a in ("zor", "quin", "vexa", "plum", "harrow", "mistle", "cor", "tellu", "bramble")
          for b in ("blax", "tor", "dyne", "fen")]
_TOPICS = [f"{a} {b}" for a in ("spectral", "satellite", "genome", "printer", "chess", "weather")
           for b in ("audio", "image", "record", "queue", "track", "event")]
_ADJECTIVES = ["fast", "small", "portable", "robust", "modern", "minimal", "flexible", "mature", "secure"]
# made-up words for filler sentences: no verb the question templates know, so each description asks one question,
# and little overlap between descriptions, so no distractor looks like it states another package's answer
_VOCAB = sorted({c + v + c2 + v2 for c in "bdgklmnprstvz" for v in "aeiou" for c2 in "bdklmnrs" for v2 in "aio"})


def _description(name: str, topic: str, i: int) -> list[str]:
    """A Translation-en long description of 60-150 words: one answerable sentence, a list (dropped), filler."""
    rng = random.Random(i)
    filler = [" ".join(rng.sample(_VOCAB, 11)) for _ in range(5)]
    return [
        f" The {name.capitalize()} {topic.split()[1]} toolkit is a {_ADJECTIVES[i % 9]} library for {topic} files.",
        f" Many {filler[0]} toolkit.",
        " .",
        " Features:",
        "  * colour output",
        "  * sane defaults",
        " .",
        *(f" Many {f} {topic}." for f in filler[1:]),
    ]


def _write_index(folder: Path, compress: bool = False) -> tuple[Path, Path]:
    trans: list[str] = []
    pkgs: list[str] = []
    for i, (name, topic) in enumerate(zip(_NAMES, _TOPICS)):
        for binary in (name, f"lib{name}-dev") if i < 2 else (name,):
            summary = f"{topic} toolkit" + (" (development files)" if binary != name else "")
            trans += [f"Package: {binary}", f"Description-md5: {i:032x}", f"Description-en: {summary}"]
            body = _description(name, topic, i)
            if binary != name:
                body = body + [" .", f" This package contains the development files for {name} {topic} work."]
            trans += body + [""]
            pkgs += [f"Package: {binary}", f"Source: {name} (1.0-{i})", "Version: 1.0", f"Description: {summary}", ""]
    t, p = folder / "Translation-en", folder / "Packages"
    t.write_text("\n".join(trans), encoding="utf-8")
    p.write_text("\n".join(pkgs), encoding="utf-8")
    if compress:
        gz = folder / "Translation-en.gz"
        gz.write_bytes(gzip.compress(t.read_bytes(), mtime=0))
        t.unlink()
        t = gz
    return t, p


def test_reads_prose_only(tmp_path: Path) -> None:
    t, p = _write_index(tmp_path)
    descs = {d.package: d for d in sd.read_descriptions(t)}
    assert set(descs) == set(_NAMES) | {f"lib{n}-dev" for n in _NAMES[:2]}
    text = " ".join(descs["zorblax"].paragraphs)
    assert "Features" not in text and "colour output" not in text  # list and its lead-in dropped
    assert text.startswith("The Zorblax audio toolkit is a fast library for spectral audio files.")
    assert sd.read_sources(p)["libzorblax-dev"] == "zorblax"
    assert sd.read_sources(None) == {}


def test_builds_on_synthetic_index(tmp_path: Path) -> None:
    t, p = _write_index(tmp_path)
    rows = sd.build_examples(t, p, 6, seed=0)
    assert len(rows) == 6
    _check_rows(rows)
    for r in rows:
        # packages of one source are never each other's distractors
        sources = [sd.read_sources(p)[_package(d["id"])] for d in r["documents"]]
        assert len(set(sources)) == len(sources)


def test_deterministic_and_seeded(tmp_path: Path) -> None:
    t, p = _write_index(tmp_path)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    sd.write_jsonl(a, sd.build_examples(t, p, 6, seed=0))
    sd.write_jsonl(b, sd.build_examples(t, p, 6, seed=0))
    assert a.read_bytes() == b.read_bytes()
    other = sd.build_examples(t, p, 6, seed=3)
    assert [r["query"] for r in other] != [json.loads(x)["query"] for x in a.read_text().splitlines()]


def test_cli_reads_compressed_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t, p = _write_index(tmp_path, compress=True)
    out = tmp_path / "out"
    assert sd.main(["--translations", str(t), "--packages", str(p), "--out", str(out), "--examples", "6"]) == 0
    rows = [json.loads(x) for x in (out / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    _check_rows(rows)
    assert "3 matched, 3 mismatched" in capsys.readouterr().out


def test_bad_arguments(tmp_path: Path) -> None:
    t, p = _write_index(tmp_path)
    with pytest.raises(ValueError, match="even number"):
        sd.build_examples(t, p, 5, seed=0)
    assert sd.main(["--translations", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    with pytest.raises(ValueError, match="only"):
        sd.build_examples(t, p, 80, seed=0)  # 36 sources cannot give 80 examples
