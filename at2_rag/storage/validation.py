"""Error-message helpers for untrusted files (estimator folders, reference estimators): shared by both readers so
neither imports the other."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

_JSON_TYPE_NAMES = {str: "string", bool: "boolean", int: "integer", float: "number", list: "array", dict: "object"}


def describe_value(value: Any) -> str:
    """A short `type value` phrase for error messages (JSON type names: the files are JSON or plain dicts)."""
    if value is None:
        return "null"
    name = _JSON_TYPE_NAMES.get(type(value)) or type(value).__name__
    text = repr(value)
    return f"{name} {text[:60] + '...' if len(text) > 60 else text}"


def describe_validation_error(exc: ValidationError, where: str) -> str:
    """`where: field 'a.b': what was wrong (got ...)` for each error pydantic found, so a user can fix the file."""
    problems = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(part) for part in err["loc"]) or "(the top level)"
        got = "" if err["type"] == "missing" else f" (got {describe_value(err.get('input'))})"
        problems.append(f"field {field!r}: {err['msg']}{got}")
    return f"{where}: " + "; ".join(problems)
