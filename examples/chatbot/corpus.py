"""Load a folder of .txt/.md files into passages and retrieve the best ones for a question with BM25 (bm25s).

Every file becomes one or more passages (paragraphs packed up to `max_chars`), so a long file never floods
the model's context. Files that cannot be read are reported, not fatal: the rest is still indexed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from at2_rag import Document

logger = logging.getLogger(__name__)

EXTENSIONS = (".md", ".markdown", ".txt")
DEFAULT_MAX_CHARS = 1500
_HEADING = re.compile(r"\A\s*#{1,6}[ \t]+(?P<title>[^\n]+?)[ \t#]*(?:\n+|\Z)")


@dataclass
class Passage:
    """A retrievable unit: the text given to the model, with where it came from.

    `text` is an exact slice of the file's (newline-normalised) text: `full_text[offset:offset + len(text)]`, so a
    character offset inside the passage maps onto the whole file by adding `offset`."""

    id: str
    title: str
    text: str
    path: str  # relative to the corpus folder, or the uploaded file's name
    part: int = 1
    parts: int = 1
    offset: int = 0  # where `text` starts in the whole file's text
    source: str = "folder"  # "folder" or "upload"
    doc_id: str = ""  # the file this passage belongs to (GET /api/documents/{doc_id})

    def to_document(self, bm25_score: float, rank: int) -> Document:
        return Document(
            id=self.id,
            text=self.text,
            title=self.title,
            metadata={
                "path": self.path, "part": self.part, "parts": self.parts, "bm25": bm25_score, "bm25_rank": rank,
                "offset": self.offset, "source": self.source, "doc_id": self.doc_id or self.path,
            },
        )


@dataclass
class LoadReport:
    """What happened while loading a folder: passages, files indexed and files skipped (with the reason)."""

    folder: str
    passages: list[Passage] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    problems: list[dict[str, str]] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)  # file -> its whole (newline-normalised) text


def _title_and_body(text: str, fallback: str) -> tuple[str, int]:
    """A leading markdown heading becomes the title (the body starts after it); else the file name is the title.
    Returns the title and where the body starts in `text`."""
    m = _HEADING.match(text)
    if m:
        return m.group("title").strip(), m.end()
    return fallback, 0


def _pack_paragraphs(body: str, max_chars: int) -> list[tuple[int, int]]:
    """Split on blank lines and pack whole paragraphs into chunks of at most ~max_chars characters.

    Returns (start, end) spans of `body`: every chunk is an exact slice, so offsets inside it map back."""
    paragraphs: list[tuple[int, int]] = []
    pos = 0
    for m in re.finditer(r"\n[ \t]*\n\s*|\Z", body):
        seg = body[pos : m.start()]
        lead = len(seg) - len(seg.lstrip())
        start, end = pos + lead, pos + len(seg.rstrip())
        if end > start:
            paragraphs.append((start, end))
        pos = m.end()
        if m.start() == len(body):
            break
    chunks: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for start, end in paragraphs:
        while end - start > max_chars:  # a giant paragraph: cut at the last sentence end (or space) before the limit
            window = body[start : start + max_chars]
            cut = max(window.rfind(". "), window.rfind(" "))
            cut = cut + 1 if cut > 0 else max_chars
            if current:
                chunks.append(current)
                current = None
            piece = body[start : start + cut]
            chunks.append((start, start + len(piece.rstrip())))
            start += cut
            while start < end and body[start].isspace():
                start += 1
        if start >= end:
            continue
        if current and (end - current[0]) > max_chars:
            chunks.append(current)
            current = None
        current = (current[0], end) if current else (start, end)
    if current:
        chunks.append(current)
    return chunks


def _pretty_name(path: Path) -> str:
    return path.stem.replace("-", " ").replace("_", " ").strip().capitalize() or path.name


def normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def text_to_passages(
    text: str,
    path: str,
    fallback_title: str,
    max_chars: int = DEFAULT_MAX_CHARS,
    *,
    doc_id: str = "",
    source: str = "folder",
) -> list[Passage]:
    """One file's (newline-normalised) text as passages; [] when it has no text. Passage ids are `doc_id`
    (or the path) for a one-passage file, `doc_id#i` otherwise."""
    title, body_start = _title_and_body(text, fallback_title)
    spans = _pack_paragraphs(text[body_start:], max_chars)
    key = doc_id or path
    out = []
    for i, (start, end) in enumerate(spans, 1):
        many = len(spans) > 1
        out.append(
            Passage(
                id=f"{key}#{i}" if many else key,
                title=f"{title} (part {i}/{len(spans)})" if many else title,
                text=text[body_start + start : body_start + end],
                path=path,
                part=i,
                parts=len(spans),
                offset=body_start + start,
                source=source,
                doc_id=key,
            )
        )
    return out


def decode_text(raw: bytes) -> str:
    """UTF-8 text (a BOM is dropped) with normalised newlines; ValueError with a reason for people otherwise."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 text (byte {exc.start})") from None
    if "\x00" in text:
        raise ValueError("looks like a binary file (contains NUL bytes)")
    return normalise_newlines(text)


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
            text = decode_text(path.read_bytes())
        except ValueError as exc:
            report.problems.append({"file": rel, "error": f"{exc}; skipped"})
            continue
        except OSError as exc:
            report.problems.append({"file": rel, "error": f"cannot be read: {exc.strerror or exc}; skipped"})
            continue
        passages = text_to_passages(text, rel, _pretty_name(path), max_chars)
        if not passages:
            report.problems.append({"file": rel, "error": "is empty; skipped"})
            continue
        report.files.append(rel)
        report.texts[rel] = text
        report.passages.extend(passages)
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
