"""Extract the text of one uploaded PDF in a process of its own (run by `uploads.pdf_text`).

Why a process: a small hostile PDF (a compressed content stream that expands to millions of characters, or
thousands of pages) can keep pypdf busy for minutes and take a lot of memory. In a child process it can be killed
at a time limit and capped in memory, and the server's own threads are never held.

Protocol: the PDF's bytes on stdin; arguments `MAX_TEXT_BYTES MAX_PAGES`; one JSON object on stdout, either
`{"text": str, "title": str | null}` or `{"error": KIND, ...}` with KIND one of "encrypted", "too_many_pages"
(`pages`), "text_too_large" (`bytes`, `page`) or "unreadable" (`type`: the exception's class name).
This file imports nothing from the chatbot package, so it runs as a plain script (`python -I pdf_worker.py`).
"""

from __future__ import annotations

import io
import json
import sys
from typing import Any

MEMORY_LIMIT_BYTES = 1024 * 1024 * 1024  # address space of the worker; pypdf on a sane PDF needs far less


def extract(raw: bytes, max_text_bytes: int, max_pages: int) -> dict[str, Any]:
    """The text of the PDF (pages separated by blank lines) and its title, stopping as soon as the text
    extracted so far is over `max_text_bytes` (UTF-8)."""
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(raw))
    if reader.is_encrypted and not reader.decrypt(""):
        return {"error": "encrypted"}
    count = len(reader.pages)
    if count > max_pages:
        return {"error": "too_many_pages", "pages": count}
    pages: list[str] = []
    size = 0
    for number, page in enumerate(reader.pages, 1):
        text = (page.extract_text() or "").strip()
        size += len(text.encode("utf-8", "surrogatepass")) + 2
        if size > max_text_bytes:
            return {"error": "text_too_large", "bytes": size, "page": number}
        pages.append(text)
    title = None
    try:
        title = (reader.metadata.title or "").strip() if reader.metadata else None
    except Exception:  # broken metadata is no reason to refuse the text
        title = None
    return {"text": "\n\n".join(p for p in pages if p), "title": title or None}


def _limit_memory() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    except (ImportError, ValueError, OSError):  # not on this platform, or already lower
        pass


def main(argv: list[str]) -> int:
    max_text_bytes, max_pages = int(argv[0]), int(argv[1])
    _limit_memory()
    raw = sys.stdin.buffer.read()
    try:
        result = extract(raw, max_text_bytes, max_pages)
    except MemoryError:
        result = {"error": "unreadable", "type": "MemoryError"}
    except Exception as exc:  # pypdf raises many kinds on broken files
        result = {"error": "unreadable", "type": type(exc).__name__}
    sys.stdout.write(json.dumps(result, ensure_ascii=True))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
