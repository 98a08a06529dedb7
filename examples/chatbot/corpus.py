"""Load a folder of .txt/.md files into passages and retrieve the best ones for a question with BM25 (bm25s).

Every file becomes one or more passages (paragraphs packed up to `max_chars`), so a long file never floods
the model's context. Files that cannot be read are reported, not fatal: the rest is still indexed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from at2_rag import Document

logger = logging.getLogger(__name__)

EXTENSIONS = (".md", ".markdown", ".txt")
DEFAULT_MAX_CHARS = 1500
_HEADING = re.compile(r"\A\s*#{1,6}[ \t]+(?P<title>[^\n]+?)[ \t#]*(?:\n+|\Z)")


@dataclass
class Passage:
    """A retrievable unit: the text given to the model, with where it came from."""

    id: str
    title: str
    text: str
    path: str  # relative to the corpus folder
    part: int = 1
    parts: int = 1

    def to_document(self, bm25_score: float, rank: int) -> Document:
        return Document(
            id=self.id,
            text=self.text,
            title=self.title,
            metadata={"path": self.path, "part": self.part, "parts": self.parts, "bm25": bm25_score, "bm25_rank": rank},
        )


@dataclass
class LoadReport:
    """What happened while loading a folder: passages, files indexed and files skipped (with the reason)."""

    folder: str
    passages: list[Passage] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    problems: list[dict[str, str]] = field(default_factory=list)


def _title_and_body(text: str, fallback: str) -> tuple[str, str]:
    """A leading markdown heading becomes the title (and leaves the body); else the file name is the title."""
    m = _HEADING.match(text)
    if m:
        return m.group("title").strip(), text[m.end() :].strip()
    return fallback, text.strip()


def _pack_paragraphs(body: str, max_chars: int) -> list[str]:
    """Split on blank lines and pack whole paragraphs into chunks of at most ~max_chars characters."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", body) if p.strip()]
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for para in paragraphs:
        while len(para) > max_chars:  # a giant paragraph: cut at the last sentence end (or space) before the limit
            cut = max(para.rfind(". ", 0, max_chars), para.rfind(" ", 0, max_chars))
            cut = cut + 1 if cut > 0 else max_chars
            if current:
                chunks.append("\n\n".join(current))
                current, size = [], 0
            chunks.append(para[:cut].strip())
            para = para[cut:].strip()
        if current and size + len(para) + 2 > max_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
        if para:
            current.append(para)
            size += len(para) + 2
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def _pretty_name(path: Path) -> str:
    return path.stem.replace("-", " ").replace("_", " ").strip().capitalize() or path.name


def load_folder(folder: str | Path, max_chars: int = DEFAULT_MAX_CHARS) -> LoadReport:
    """Read every .txt/.md file under `folder` (recursively, hidden files skipped) into passages."""
    root = Path(folder).expanduser()
    report = LoadReport(folder=str(root))
    if not root.is_dir():
        report.problems.append({"file": str(root), "error": "folder does not exist or is not a directory"})
        return report
    candidates = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and (p.is_file() or p.is_symlink())
    )
    for path in candidates:
        rel = path.relative_to(root).as_posix()
        try:
            raw = path.read_bytes()
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            report.problems.append({"file": rel, "error": f"not valid UTF-8 text (byte {exc.start}); skipped"})
            continue
        except OSError as exc:
            report.problems.append({"file": rel, "error": f"cannot be read: {exc.strerror or exc}; skipped"})
            continue
        if "\x00" in text:
            report.problems.append({"file": rel, "error": "looks like a binary file (contains NUL bytes); skipped"})
            continue
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        title, body = _title_and_body(text, _pretty_name(path))
        chunks = _pack_paragraphs(body, max_chars)
        if not chunks:
            report.problems.append({"file": rel, "error": "is empty; skipped"})
            continue
        report.files.append(rel)
        for i, chunk in enumerate(chunks, 1):
            many = len(chunks) > 1
            report.passages.append(
                Passage(
                    id=f"{rel}#{i}" if many else rel,
                    title=f"{title} (part {i}/{len(chunks)})" if many else title,
                    text=chunk,
                    path=rel,
                    part=i,
                    parts=len(chunks),
                )
            )
    return report


def _stemmer():
    try:
        import Stemmer  # PyStemmer, optional: better recall ("days" matches "day")

        return Stemmer.Stemmer("english")
    except Exception:  # pragma: no cover - depends on the environment
        return None


class BM25Index:
    """BM25 over passages (title + text), via bm25s."""

    def __init__(self, passages: Sequence[Passage]) -> None:
        import bm25s

        self._bm25s = bm25s
        self.passages = list(passages)
        self.stemmer = _stemmer()
        self.retriever = None
        if self.passages:
            corpus = [f"{p.title}\n{p.text}" for p in self.passages]
            tokens = bm25s.tokenize(corpus, stopwords="en", stemmer=self.stemmer, show_progress=False)
            self.retriever = bm25s.BM25()
            self.retriever.index(tokens, show_progress=False)

    def __len__(self) -> int:
        return len(self.passages)

    def search(self, query: str, k: int = 4) -> list[tuple[Passage, float]]:
        """The top-k passages with their BM25 scores, best first; passages with score 0 are left out."""
        if not self.retriever or not query.strip():
            return []
        tokens = self._bm25s.tokenize(
            [query], stopwords="en", stemmer=self.stemmer, return_ids=False, show_progress=False
        )
        if not tokens or not tokens[0]:
            return []
        k = max(1, min(k, len(self.passages)))
        ids, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [(self.passages[int(i)], float(s)) for i, s in zip(ids[0], scores[0]) if float(s) > 0]
