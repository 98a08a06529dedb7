"""Packaging facts a user sees on PyPI and in a terminal, checked without building anything (the slow
test_wheels.py builds and installs the distributions): README links that work off GitHub, one repository URL, the
same LICENSE in every distribution, typed packages, bounded internal dependencies, a changelog entry for the
version, `at2-rag --version`, and the JSONL fields in `--help`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

from at2_rag import __version__
from at2_rag.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PROJECTS = {
    ROOT: "at2_rag",
    ROOT / "integrations" / "langchain": "langchain_at2",
    ROOT / "integrations" / "llamaindex": "llama_index/postprocessor/at2",
}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _project(folder: Path) -> dict:
    return tomllib.loads((folder / "pyproject.toml").read_text())


REPO_URL = _project(ROOT)["project"]["urls"]["Repository"]


@pytest.mark.parametrize("folder", list(PROJECTS), ids=lambda p: p.name or "root")
def test_readme_links_are_absolute_and_name_one_repository(folder: Path) -> None:
    """A README is the PyPI page: a relative link or image breaks there, and every link into the repository uses
    the one URL pyproject.toml declares."""
    text = (folder / "README.md").read_text()
    links = LINK.findall(text)
    assert links, folder
    for target in links:
        assert target.startswith(("https://", "#")), f"{folder / 'README.md'}: relative link {target}"
        if "github.com" in target:
            assert target.startswith(REPO_URL + "/") or target.startswith(REPO_URL + "#") or target == REPO_URL, target
    assert "../" not in text
    # what a user reads first is pip's path, not a clone's .venv
    assert ".venv/bin" not in text.split("## From a clone")[0].split("## Tests")[0]


@pytest.mark.parametrize("folder", list(PROJECTS), ids=lambda p: p.name or "root")
def test_distribution_metadata(folder: Path) -> None:
    project = _project(folder)
    meta = project["project"]
    assert meta["license"] == "MIT" and meta["license-files"] == ["LICENSE"]
    assert (folder / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()
    assert (folder / PROJECTS[folder] / "py.typed").is_file()
    assert "Typing :: Typed" in meta["classifiers"]
    assert all(url.startswith(REPO_URL) for url in meta["urls"].values()), meta["urls"]
    requires = " ".join(project["build-system"]["requires"])
    assert "setuptools>=77" in requires or "hatchling>=1.27" in requires  # SPDX license + license-files
    internal = [d for d in meta["dependencies"] if d.startswith("at2-rag")]
    assert internal in ([], ["at2-rag>=0.1,<0.2"]), internal


def test_changelog_names_this_version() -> None:
    assert f"## {__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"at2-rag {__version__}"


def _help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert isinstance(sub.choices, dict)
    return sub.choices[command].format_help()


def test_help_lists_jsonl_fields_and_device() -> None:
    attribute = _help("attribute")
    for field in ("text", "id", "title", "url", "metadata"):
        assert re.search(rf"^  {field} ", attribute, re.M), attribute
    for command in ("collect", "evaluate"):
        text = _help(command)
        for field in ("id", "query", "documents", "history"):
            assert re.search(rf"^  {field} ", text, re.M), text
    for command in ("demo", "attribute", "collect", "evaluate"):
        assert "--device" in _help(command), command
    assert "download-model" in build_parser().format_help()
