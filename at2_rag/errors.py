"""Exception types: every failure a user can cause gets its own class and a message naming the problem."""

from __future__ import annotations


class AT2Error(Exception):
    """Base class of every error raised on purpose by at2-rag."""


class NoDocumentsError(AT2Error, ValueError):
    """Attribution needs at least one document to attribute to."""


class DocumentsNotLocatedError(NoDocumentsError):
    """None of the documents occurs in an already-rendered prompt (`Attributor.attribute_rendered`).

    `unlocated` lists every document with the reason (`at2_rag.attribution.result.UnlocatedDocument`).
    """

    def __init__(self, unlocated: list) -> None:
        self.unlocated = list(unlocated)
        reasons = "; ".join(f"{u.id}: {u.reason}" for u in self.unlocated) or "no documents were given"
        super().__init__(
            f"none of the {len(self.unlocated)} documents occurs in the prompt, so there is nothing to attribute "
            f"to ({reasons})"
        )


class InvalidInputError(AT2Error, ValueError):
    """A query, document, answer or option is malformed."""


class ContextTooLongError(AT2Error, ValueError):
    """The prompt (plus the answer) does not fit in the model's context window."""

    def __init__(self, needed: int, limit: int, what: str = "prompt") -> None:
        self.needed = needed
        self.limit = limit
        super().__init__(
            f"The {what} needs {needed} tokens but the model's context window is {limit} tokens "
            f"({needed - limit} too many). Pass fewer or shorter documents, or a smaller max_new_tokens."
        )


class PromptRenderError(AT2Error, ValueError):
    """The chat template changed the document text, so source spans cannot be located exactly."""


class EstimatorMismatchError(AT2Error, ValueError):
    """The score estimator was trained for a different model (layers, heads or model id)."""


class EstimatorFormatError(AT2Error, ValueError):
    """An estimator file or folder is missing, malformed, or would need unsafe unpickling."""


class ModelNotAvailableError(AT2Error, RuntimeError):
    """A piece the embedded model needs is missing (its GGUF, or a package that reads it); the message names the
    exact command that installs it (`at2-rag download-model`, `pip install "at2-rag[embedded]"`)."""


class UnsupportedModelError(AT2Error, TypeError):
    """The model's attention does not go through transformers' AttentionInterface, so it cannot be captured."""


class InputFileError(InvalidInputError):
    """A user's input file cannot be read as text or JSON Lines: missing, a folder, binary, not UTF-8, not JSON.

    `path` names the file and `line` the 1-based line where the problem is (None when it is the whole file).
    """

    def __init__(self, message: str, path: object = None, line: int | None = None) -> None:
        self.path = path
        self.line = line
        super().__init__(message)


class InvalidExamplesError(InvalidInputError):
    """Examples (for `collect` or `evaluate`) failed validation; `problems` lists every bad one.

    Each problem is an `at2_rag.training.data.InvalidExample` (line, position, id, reason), so the message and
    the attribute name every bad example at once instead of failing on the first.
    """

    MAX_LISTED = 20

    def __init__(self, source: str, problems: list, hint: str = "") -> None:
        self.source = source
        self.problems = list(problems)
        listed = [f"  {p.describe()}" for p in self.problems[: self.MAX_LISTED]]
        if len(self.problems) > self.MAX_LISTED:
            listed.append(f"  ... and {len(self.problems) - self.MAX_LISTED} more")
        count = len(self.problems)
        head = f"{count} invalid example{'s' if count != 1 else ''} in {source}:"
        super().__init__("\n".join([head, *listed, *([hint] if hint else [])]))
