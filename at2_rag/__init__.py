"""at2-rag: which retrieved documents did the answer actually use? AT2 attribution for RAG."""

from .attributor import Attributor, CapturedRun
from .errors import (
    AT2Error,
    ContextTooLongError,
    DocumentsNotLocatedError,
    EstimatorFormatError,
    EstimatorMismatchError,
    InvalidInputError,
    NoDocumentsError,
    PromptRenderError,
    UnsupportedModelError,
)
from .estimator import ScoreEstimator
from .models import DEFAULT_MODEL_ID, load_default_model, load_model
from .prompt import PromptTemplate
from .result import Attribution, Citation, CitedDocument, ContextSource, DocumentScore, SentenceScore, UnlocatedDocument
from .sources import Document

__version__ = "0.1.0"

__all__ = [
    "AT2Error",
    "Attribution",
    "Attributor",
    "CapturedRun",
    "Citation",
    "CitedDocument",
    "ContextTooLongError",
    "DEFAULT_MODEL_ID",
    "Document",
    "DocumentScore",
    "DocumentsNotLocatedError",
    "EstimatorFormatError",
    "EstimatorMismatchError",
    "InvalidInputError",
    "NoDocumentsError",
    "PromptRenderError",
    "PromptTemplate",
    "ScoreEstimator",
    "SentenceScore",
    "ContextSource",
    "UnlocatedDocument",
    "UnsupportedModelError",
    "load_default_model",
    "load_model",
]
