"""at2-rag: which retrieved documents did the answer actually use? AT2 attribution for RAG."""

from ._version import __version__
from .attribution.estimator import ScoreEstimator
from .attribution.result import (
    Attribution,
    Citation,
    CitedDocument,
    ContextSource,
    DocumentScore,
    SentenceScore,
    UnlocatedDocument,
)
from .attribution.scoring import Scorer
from .attributor import Attributor
from .capture._runner import CapturedRun, ModelRunner
from .errors import (
    AT2Error,
    ContextTooLongError,
    DocumentsNotLocatedError,
    EstimatorFormatError,
    EstimatorMismatchError,
    InvalidInputError,
    ModelNotAvailableError,
    NoDocumentsError,
    PromptRenderError,
    UnsupportedModelError,
)
from .models import DEFAULT_MODEL_ID, download_default_model, load_default_model, load_model
from .prompting.render import PromptTemplate
from .prompting.request import TEMPLATE_DEFAULT, AttributionRequest
from .prompting.sources import Document, MappedDocuments, map_documents, to_document
from .serving.batching import MicroBatcher
from .serving.shared import clear_shared_attributors, default_attributor, get_attributor, get_micro_batcher

__all__ = [
    "AT2Error",
    "Attribution",
    "AttributionRequest",
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
    "MappedDocuments",
    "MicroBatcher",
    "ModelNotAvailableError",
    "ModelRunner",
    "Scorer",
    "TEMPLATE_DEFAULT",
    "clear_shared_attributors",
    "default_attributor",
    "download_default_model",
    "get_attributor",
    "get_micro_batcher",
    "load_default_model",
    "load_model",
    "map_documents",
    "to_document",
    "__version__",
]
