"""Files: atomic writes (readers and resumed runs never see half a file, a killed writer leaves no debris) and
checked reads of user files (a binary, non-UTF-8 or non-JSON file is an `InputFileError` naming the file and
line, never a raw traceback)."""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import InputFileError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 (and some writers, safetensors among them, recreate the file so): outputs should
        # be readable like any other file
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_NOT_UTF8_HINT = "save it as UTF-8 (a latin-1 or cp1252 file converts with `iconv -f latin1 -t utf-8`)"


def read_user_bytes(path: str | os.PathLike[str], what: str = "file") -> bytes:
    """The bytes of a user's text file, refusing early what cannot be text: a folder, a missing file, a device
    or pipe (reading one could block forever), an unreadable file, or a binary file (NUL bytes)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputFileError(f"{path} does not exist (expected a {what})", path) from None
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror or exc}", path) from exc
    if stat.S_ISDIR(mode):
        raise InputFileError(f"{path} is a folder, not a {what}", path)
    if not stat.S_ISREG(mode):
        raise InputFileError(
            f"cannot read {path}: it is not a regular file (a device, pipe or socket); expected a {what}", path
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror or exc}", path) from exc
    if b"\0" in data:
        raise InputFileError(
            f"cannot read {path}: it looks like a binary file (it contains NUL bytes), not UTF-8 text; "
            f"expected a {what}",
            path,
        )
    return data


def _decode_problem(raw: bytes, exc: UnicodeDecodeError) -> str:
    return f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1} is not valid UTF-8"


def read_user_text(path: str | os.PathLike[str], what: str = "text file") -> str:
    """A user's UTF-8 text file (a leading BOM dropped); an `InputFileError` naming the file, line and byte when
    it is not UTF-8."""
    data = read_user_bytes(path, what)
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    for n, raw in enumerate(data.splitlines(), 1):  # find the first bad line for the message
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputFileError(
                f"{path}:{n} is not UTF-8 text: {_decode_problem(raw, exc)}; {_NOT_UTF8_HINT}", path, n
            ) from None
    raise InputFileError(f"{path} is not UTF-8 text; {_NOT_UTF8_HINT}", path)  # a sequence cut at a line end


class JsonLine(NamedTuple):
    """One non-blank line of a JSON Lines file: its 1-based number, the parsed value, or why it has none."""

    line: int
    value: Any
    problem: str | None


def read_jsonl(path: str | os.PathLike[str], what: str = "JSONL file") -> list[JsonLine]:
    """Every non-blank line of a user's JSON Lines file, parsed; a line that is not UTF-8 or not JSON comes back
    with its `problem` (so callers can name every bad line), a file that cannot be text raises `InputFileError`.

    Lines are split on \\n, \\r\\n or \\r only: U+2028 and friends are legal inside JSON strings."""
    data = read_user_bytes(path, what)
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    rows: list[JsonLine] = []
    for n, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            rows.append(JsonLine(n, None, f"is not UTF-8 text: {_decode_problem(raw, exc)}; {_NOT_UTF8_HINT}"))
            continue
        try:
            rows.append(JsonLine(n, json.loads(text), None))
        except json.JSONDecodeError as exc:
            rows.append(JsonLine(n, None, f"is not valid JSON: {exc.msg} (column {exc.colno})"))
    return rows


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages ("an array", "a string", ...)."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
