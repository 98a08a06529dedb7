"""at2-rag: which retrieved documents did the answer actually use? AT2 attribution for RAG.

The names here are what a user writes: the front door (`Attributor`) and its three stages' hand-offs
(`Prepared` -> `Captured` -> `Attribution`, with `Evidence` between run and score), requests and documents, the
estimator, model loading, serving helpers and the errors worth catching. Everything else lives in its subpackage
(`prompting`, `capture`, `evidence`, `attribution`, `storage`, `serving`, `training`, `evaluation`).
"""

from ._version import __version__
from .attribution.estimator import ScoreEstimator
from .attribution.result import Attribution, Citation, DocumentScore
from .attributor import Attributor
from .capture.captured import Captured
from .errors import AT2Error, ContextTooLongError, InvalidInputError, NoDocumentsError
from .evidence.bundle import Evidence
from .model_families import load_any_model as load_model  # folders, Hub ids, GGUF files, family names
from .models import download_default_model, load_default_model
from .prompting.prepared import Prepared
from .prompting.render import PromptTemplate
from .prompting.request import AttributionRequest
from .prompting.sources import Document, map_documents, to_document
from .serving.batching import MicroBatcher
from .serving.shared import get_attributor, get_micro_batcher

__all__ = [
    "AT2Error",
    "Attribution",
    "AttributionRequest",
    "Attributor",
    "Captured",
    "Citation",
    "ContextTooLongError",
    "Document",
    "DocumentScore",
    "Evidence",
    "InvalidInputError",
    "MicroBatcher",
    "NoDocumentsError",
    "Prepared",
    "PromptTemplate",
    "ScoreEstimator",
    "__version__",
    "download_default_model",
    "get_attributor",
    "get_micro_batcher",
    "load_default_model",
    "load_model",
    "map_documents",
    "to_document",
]
