"""Documents uploaded from the page: checked, turned into text, and kept in a folder of the server's own.

Uploads are untrusted. The client's file name is only a label (`safe_name`): what is written on disk is named by
a random id, as one JSON record per document, written to a temporary file and renamed into place (never a
half-written record). Types: .txt, .md, .markdown (UTF-8) and .pdf (text extracted offline with pypdf; a scanned
PDF without a text layer is refused, with the reason). PDF text is extracted in a child process with a time and
memory limit (`pdf_worker.py`), and the extracted text of any file is held to the same size limit as the file.

A retried upload (same name, same extracted text: `content_hash`) is recognised and not stored twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import subprocess
import sys
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
PDF_TIMEOUT_S = 10.0  # a PDF whose text takes longer to extract is refused (413 pdf_too_complex)
PDF_WORKER = Path(__file__).resolve().parent / "pdf_worker.py"
# PDF extractions running at once (each in its own process); more wait their turn
_PDF_WORKERS = threading.BoundedSemaphore(max(1, min(4, (os.cpu_count() or 2) // 2)))
logger = logging.getLogger("at2_rag.chatbot")
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


def _pdf_text(raw: bytes, name: str, max_bytes: int, timeout_s: float) -> tuple[str, str | None]:
    """The text of a PDF (pages separated by blank lines) and its title from the metadata, if any, extracted by
    `pdf_worker.py` in a child process that is killed after `timeout_s` seconds (a PDF bomb cannot hold the
    server) and stops once the text passes `max_bytes`."""
    if not raw.startswith(b"%PDF-"):
        raise UploadError(422, "unreadable_file", f"{name} is not a PDF file (it does not start with %PDF-).")
    command = [sys.executable, "-I", str(PDF_WORKER), str(max_bytes), str(MAX_PDF_PAGES)]
    with _PDF_WORKERS:
        try:
            done = subprocess.run(command, input=raw, capture_output=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:  # subprocess.run has killed the worker
            logger.warning("PDF extraction of %s stopped after %.1f s", name, timeout_s)
            raise UploadError(
                413, "pdf_too_complex",
                f"{name} took more than {timeout_s:g} seconds to read and was refused (a PDF this slow to extract "
                "would hold the server). Upload its text as a .txt file instead.",
            ) from None
    try:
        result = json.loads(done.stdout)
    except ValueError:  # killed (memory limit) or crashed before answering
        logger.warning("PDF worker for %s exited with %s: %s", name, done.returncode, done.stderr[-500:])
        raise UploadError(
            422, "unreadable_file", f"{name} could not be read as a PDF (the reader failed or ran out of memory)."
        ) from None
    error = result.get("error")
    if error == "encrypted":
        raise UploadError(422, "unreadable_file", f"{name} is password-protected; upload an unprotected copy.")
    if error == "too_many_pages":
        raise UploadError(
            413, "file_too_large", f"{name} has {result['pages']:,} pages; the limit is {MAX_PDF_PAGES:,}."
        )
    if error == "text_too_large":
        raise _text_too_large(name, max_bytes)
    if error is not None:
        raise UploadError(422, "unreadable_file", f"{name} could not be read as a PDF ({result.get('type')}).")
    text = re.sub(r"[ \t]+\n", "\n", normalise_newlines(result["text"])).replace("\x00", "")
    if not text.strip():
        raise UploadError(
            422,
            "unreadable_file",
            f"{name} contains no extractable text (a scanned PDF has only images); upload a text PDF or a .txt file.",
        )
    return text, result.get("title") or None


def _text_too_large(name: str, max_bytes: int) -> UploadError:
    return UploadError(
        413,
        "text_too_large",
        f"{name}: its extracted text is larger than the limit of {_size(max_bytes)} per file; split it or upload "
        "a shorter file.",
    )


def extract_upload(
    name: str, raw: bytes, max_bytes: int, *, pdf_timeout_s: float = PDF_TIMEOUT_S
) -> dict[str, Any]:
    """Check one uploaded file and turn it into {name, kind, text, bytes, title?}; UploadError when refused.

    `max_bytes` bounds both the file and its extracted text (UTF-8): a small PDF whose text is larger is
    refused (413 `text_too_large`) like a large file."""
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
        text, title = _pdf_text(raw, name, max_bytes, pdf_timeout_s)
        kind = "pdf"
    else:
        try:
            text = decode_text(raw)
        except ValueError as exc:
            raise UploadError(422, "unreadable_file", f"{name} is {exc}; upload UTF-8 text.") from None
        kind = "markdown" if ext in (".md", ".markdown") else "text"
    if not text.strip():
        raise UploadError(422, "unreadable_file", f"{name} contains only whitespace.")
    if len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise _text_too_large(name, max_bytes)
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
                rec.setdefault("sha256", content_hash(rec["text"]))  # records written before hashes were kept
                self.records[rec["id"]] = rec
            except Exception as exc:
                self.problems.append(
                    {"file": f"uploads/{path.name}", "error": f"unreadable upload record ({exc}); skipped"}
                )
        for stale in self.folder.glob(".*.tmp"):  # a record whose writer died before the rename
            stale.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self.records)

    def find(self, name: str, text: str) -> dict[str, Any] | None:
        """The stored record with this name and this content (a retried upload), or None."""
        digest = content_hash(text)
        for rec in self.records.values():
            if rec["name"] == name and rec.get("sha256", "") == digest:
                return rec
        return None

    def add(self, item: dict[str, Any]) -> dict[str, Any]:
        """Write one document's record durably (temporary file, fsync, rename, fsync of the folder): once this
        returns, a crash of the server does not lose it."""
        with self._lock:
            doc_id = secrets.token_hex(6)
            while doc_id in self.records:
                doc_id = secrets.token_hex(6)
            rec = {
                **item, "id": doc_id, "uploaded": time.time(), "chars": len(item["text"]),
                "sha256": content_hash(item["text"]),
            }
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
            _fsync_folder(self.folder)
            self.records[doc_id] = rec
            return rec

    def remove(self, doc_id: str) -> bool:
        with self._lock:
            if not _ID.match(doc_id) or doc_id not in self.records:
                return False
            (self.folder / f"{doc_id}.json").unlink(missing_ok=True)
            _fsync_folder(self.folder)
            del self.records[doc_id]
            return True


def content_hash(text: str) -> str:
    """SHA-256 of a document's extracted text: the same file uploaded again (a retry) has the same hash."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _fsync_folder(folder: Path) -> None:
    """Make a rename or unlink in `folder` durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
