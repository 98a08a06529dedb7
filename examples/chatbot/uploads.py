"""Documents uploaded from the page: checked, turned into text, and kept in a folder of the server's own.

Uploads are untrusted. The client's file name is only a label (`safe_name`): what is written on disk is named by
a random id, as one JSON record per document, written to a temporary file and renamed into place (never a
half-written record). Types: .txt, .md, .markdown (UTF-8) and .pdf (text extracted offline with pypdf; a scanned
PDF without a text layer is refused, with the reason).
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import tempfile
import threading
import time
import unicodedata
from pathlib import Path
from typing import Any

from .corpus import decode_text, normalise_newlines

TEXT_TYPES = (".txt", ".md", ".markdown")
PDF_TYPES = (".pdf",)
ALLOWED_TYPES = TEXT_TYPES + PDF_TYPES
MAX_PDF_PAGES = 300
_ID = re.compile(r"\A[0-9a-f]{12}\Z")


class UploadError(Exception):
    """A file that is refused: `status` (HTTP), `kind` (machine-readable) and a message for people."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def safe_name(raw: str | None) -> str:
    """The client's file name as a harmless label: its last path component only (no folders, no `..`), no
    control or odd characters, at most 120 characters. Never used as a path."""
    name = unicodedata.normalize("NFC", str(raw or ""))
    name = re.split(r"[\\/]", name)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] not in "CZ" or c == " ")
    name = re.sub(r"[^\w .()+,@-]", "_", name).strip(" .")
    if len(name) > 120:
        stem, dot, ext = name.rpartition(".")
        name = (stem[: 120 - len(ext) - 1] + "." + ext) if dot and len(ext) <= 10 else name[:120]
    return name or "untitled.txt"


def _pdf_text(raw: bytes, name: str) -> tuple[str, str | None]:
    """The text of a PDF (pages separated by blank lines) and its title from the metadata, if any."""
    if not raw.startswith(b"%PDF-"):
        raise UploadError(422, "unreadable_file", f"{name} is not a PDF file (it does not start with %PDF-).")
    try:
        from pypdf import PdfReader
    except ImportError:  # pragma: no cover - pypdf is in the app's dependencies
        raise UploadError(
            415, "unsupported_type", "PDF upload needs the pypdf package on the server (pip install pypdf)."
        ) from None
    try:
        reader = PdfReader(io.BytesIO(raw))
        if reader.is_encrypted and not reader.decrypt(""):
            raise UploadError(422, "unreadable_file", f"{name} is password-protected; upload an unprotected copy.")
        if len(reader.pages) > MAX_PDF_PAGES:
            raise UploadError(
                413, "file_too_large", f"{name} has {len(reader.pages):,} pages; the limit is {MAX_PDF_PAGES:,}."
            )
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
        title = None
        try:
            title = (reader.metadata.title or "").strip() if reader.metadata else None
        except Exception:
            title = None
    except UploadError:
        raise
    except Exception as exc:  # pypdf raises many kinds on broken files
        raise UploadError(
            422, "unreadable_file", f"{name} could not be read as a PDF ({type(exc).__name__})."
        ) from None
    text = "\n\n".join(p for p in pages if p)
    text = re.sub(r"[ \t]+\n", "\n", normalise_newlines(text)).replace("\x00", "")
    if not text.strip():
        raise UploadError(
            422,
            "unreadable_file",
            f"{name} contains no extractable text (a scanned PDF has only images); upload a text PDF or a .txt file.",
        )
    return text, title or None


def extract_upload(name: str, raw: bytes, max_bytes: int) -> dict[str, Any]:
    """Check one uploaded file and turn it into {name, kind, text, bytes, title?}; UploadError when refused."""
    ext = os.path.splitext(name)[1].lower()
    if ext not in ALLOWED_TYPES:
        shown = ext or "(no extension)"
        raise UploadError(
            415, "unsupported_type", f"{name}: {shown} files are not supported; upload .txt, .md or .pdf files."
        )
    if len(raw) > max_bytes:
        raise UploadError(
            413,
            "file_too_large",
            f"{name} is larger than the limit of {_size(max_bytes)}; split it or upload a shorter file.",
        )
    if not raw:
        raise UploadError(422, "unreadable_file", f"{name} is empty.")
    title = None
    if ext in PDF_TYPES:
        text, title = _pdf_text(raw, name)
        kind = "pdf"
    else:
        try:
            text = decode_text(raw)
        except ValueError as exc:
            raise UploadError(422, "unreadable_file", f"{name} is {exc}; upload UTF-8 text.") from None
        kind = "markdown" if ext in (".md", ".markdown") else "text"
    if not text.strip():
        raise UploadError(422, "unreadable_file", f"{name} contains only whitespace.")
    return {"name": name, "kind": kind, "text": text, "bytes": len(raw), "title": title}


def _size(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MB".replace(".0 MB", " MB")
    if n >= 1024:
        return f"{n / 1024:.0f} KB"
    return f"{n} bytes"


class UploadStore:
    """Uploaded documents as JSON records `<id>.json` in `folder` (created if needed; a temporary folder when None)."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = (
            Path(folder).expanduser() if folder is not None else Path(tempfile.mkdtemp(prefix="at2-chatbot-uploads-"))
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.records: dict[str, dict[str, Any]] = {}
        self.problems: list[dict[str, str]] = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                rec = json.loads(path.read_text("utf-8"))
                if not (_ID.match(str(rec.get("id"))) and path.stem == rec["id"] and isinstance(rec.get("text"), str)):
                    raise ValueError("not an upload record")
                self.records[rec["id"]] = rec
            except Exception as exc:
                self.problems.append(
                    {"file": f"uploads/{path.name}", "error": f"unreadable upload record ({exc}); skipped"}
                )
        for stale in self.folder.glob(".*.tmp"):  # a record whose writer died before the rename
            stale.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self.records)

    def add(self, item: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            doc_id = secrets.token_hex(6)
            while doc_id in self.records:
                doc_id = secrets.token_hex(6)
            rec = {**item, "id": doc_id, "uploaded": time.time(), "chars": len(item["text"])}
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(rec, f, ensure_ascii=False)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.folder / f"{doc_id}.json")
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self.records[doc_id] = rec
            return rec

    def remove(self, doc_id: str) -> bool:
        with self._lock:
            if not _ID.match(doc_id) or doc_id not in self.records:
                return False
            (self.folder / f"{doc_id}.json").unlink(missing_ok=True)
            del self.records[doc_id]
            return True
