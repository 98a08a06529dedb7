"""Tests for the offline RAG dataset builder (needs Debian's python3-doc: `apt-get install python3-doc`)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest


def _load_builder():
    """scripts/build_dataset.py is a data-preparation script outside the package: load it from its path."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "build_dataset.py"
    spec = importlib.util.spec_from_file_location("build_dataset", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


db = _load_builder()


# A few prose-heavy sections keep the test fast while still exercising real pages.
SECTIONS = ("tutorial", "faq", "glossary.html")
N_TRAIN, N_HELDOUT = 20, 5


@pytest.fixture(scope="module")
def doc_root() -> Path:
    """The python3-doc HTML tree; a system package that `make test` installs where it can (as root), so without
    it the tests that read it skip, saying so."""
    try:
        return db.find_doc_root()
    except db.DocsNotFoundError:
        pytest.skip(
            "python3-doc not installed (Debian's Python docs are the builder's input): run `make system-deps` "
            "as root, or set AT2_PYTHON_DOCS to a Python docs html folder"
        )


@pytest.fixture(scope="module")
def built(doc_root: Path) -> tuple[list[dict], list[dict]]:
    return db.build_examples(doc_root, N_TRAIN, N_HELDOUT, seed=0, sections=SECTIONS)


def _pages(rows: list[dict]) -> set[str]:
    return {d["id"].split("#", 1)[0] for r in rows for d in r["documents"]}


def test_counts_and_schema(built: tuple[list[dict], list[dict]]) -> None:
    train, heldout = built
    assert len(train) == N_TRAIN and len(heldout) == N_HELDOUT
    for row in train + heldout:
        assert set(row) == {"id", "query", "documents", "relevant_ids", "answer_hint"}
        assert row["query"].endswith("?") and len(row["query"].split()) >= 4
        for d in row["documents"]:
            assert set(d) == {"id", "title", "text", "url"}
            assert d["url"].startswith("file://") and ".html" in d["url"]
            assert "#p" in d["id"] and d["title"] and d["text"]
    assert len({r["id"] for r in train + heldout}) == N_TRAIN + N_HELDOUT


def test_deterministic(doc_root: Path, built: tuple[list[dict], list[dict]], tmp_path: Path) -> None:
    again = db.build_examples(doc_root, N_TRAIN, N_HELDOUT, seed=0, sections=SECTIONS)
    for name, a, b in (("a", built[0], again[0]), ("b", built[1], again[1])):
        db.write_jsonl(tmp_path / f"{name}1.jsonl", a)
        db.write_jsonl(tmp_path / f"{name}2.jsonl", b)
        assert (tmp_path / f"{name}1.jsonl").read_bytes() == (tmp_path / f"{name}2.jsonl").read_bytes()
    other = db.build_examples(doc_root, N_TRAIN, N_HELDOUT, seed=1, sections=SECTIONS)
    assert [r["query"] for r in other[0]] != [r["query"] for r in built[0]]


def test_no_page_overlap_between_splits(built: tuple[list[dict], list[dict]]) -> None:
    train, heldout = built
    assert not _pages(train) & _pages(heldout)


def test_relevant_docs_and_answer(built: tuple[list[dict], list[dict]]) -> None:
    for row in built[0] + built[1]:
        docs = {d["id"]: d for d in row["documents"]}
        assert 1 <= len(row["relevant_ids"]) <= 2
        assert all(rid in docs for rid in row["relevant_ids"])
        # the question was made from relevant_ids[0], which holds the answer sentence
        assert row["answer_hint"] in docs[row["relevant_ids"][0]]["text"]
        src_page = row["relevant_ids"][0].split("#")[0]
        for did, d in docs.items():
            if did not in row["relevant_ids"]:
                assert did.split("#")[0] != src_page  # distractors come from other pages
                assert row["answer_hint"] not in d["text"]


def test_document_count_and_word_budget(built: tuple[list[dict], list[dict]]) -> None:
    for row in built[0] + built[1]:
        assert db.MIN_DOCS <= len(row["documents"]) <= db.MAX_DOCS
        words = sum(len(d["text"].split()) for d in row["documents"])
        assert db.MIN_EXAMPLE_WORDS <= words <= db.MAX_EXAMPLE_WORDS
        assert sum(len(d["text"]) for d in row["documents"]) <= db.MAX_EXAMPLE_CHARS
        assert len({d["id"] for d in row["documents"]}) == len(row["documents"])


def test_passages_are_clean(doc_root: Path) -> None:
    passages = db.load_passages(doc_root, ("library/json.html",))
    assert passages
    for p in passages:
        assert db.MIN_KEEP_WORDS <= p.n_words <= db.MAX_PASSAGE_WORDS
        assert ">>>" not in p.text and "\u00b6" not in p.text
        assert p.id.startswith("library/json.html#p")
        assert p.title.startswith("json")
    assert any("json.dumps(): Serialize obj" in p.text for p in passages)


def test_question_templates() -> None:
    case = db._CaseModel([])
    assert db._declarative_questions(
        "The json module exposes an API familiar to users of marshal and pickle.", None, "json", case
    ) == ["What does the json module expose?"]
    assert db._imperative_questions("Return the number of objects in the permanent generation.",
                                     "gc.get_freeze_count()") == ["What does gc.get_freeze_count() return?"]
    assert db._imperative_questions("Raise ValueError if x is negative.", "math.f()") == [
        "When does math.f() raise ValueError?"
    ]
    assert db._declarative_questions("This module provides access to the Unix shadow password database.",
                                     None, "spwd", case) == ["What does the spwd module provide?"]


def test_write_jsonl_atomic(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "x.jsonl"
    db.write_jsonl(out, [{"a": 1}, {"b": "é"}])
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == [{"a": 1}, {"b": "é"}]
    assert not [p for p in out.parent.iterdir() if p.name != "x.jsonl"]  # no temp file left behind


def test_missing_doc_root_gives_install_hint(tmp_path: Path) -> None:
    with pytest.raises(db.DocsNotFoundError, match="apt-get install -y python3-doc"):
        db.build_examples(tmp_path / "nope", 1, 1, seed=0)


def test_cli(doc_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = db.main(["--out", str(tmp_path), "--train", "3", "--heldout", "2", "--seed", "0",
                  "--doc-root", str(doc_root), "--sections", "tutorial", "faq"])
    assert rc == 0
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 3
    assert len((tmp_path / "heldout.jsonl").read_text().splitlines()) == 2
    assert "wrote 3 train + 2 heldout" in capsys.readouterr().out
    assert db.main(["--out", str(tmp_path), "--doc-root", str(tmp_path / "missing")]) == 2
