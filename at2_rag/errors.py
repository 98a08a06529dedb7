"""Exception types: every failure a user can cause gets its own class and a message naming the problem."""

from __future__ import annotations


class AT2Error(Exception):
    """Base class of every error raised on purpose by at2-rag."""


class NoDocumentsError(AT2Error, ValueError):
    """Attribution needs at least one document to attribute to."""


class DocumentsNotLocatedError(NoDocumentsError):
    """None of the documents occurs in an already-rendered prompt (`Attributor.attribute_rendered`).

    `unlocated` lists every document with the reason (`at2_rag.result.UnlocatedDocument`).
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


class UnsupportedModelError(AT2Error, TypeError):
    """The model's attention does not go through transformers' AttentionInterface, so it cannot be captured."""
