"""A citation-grounded chatbot: BM25 retrieval over a folder of .txt/.md files, answers streamed from the
model, and AT2 attribution turned into per-sentence citations with highlighted supporting sentences.

Start it from the repository root:

    python examples/chatbot/app.py [--docs FOLDER] [--port 8000]

The page is plain HTML/CSS/JS in `static/`; the API is:

    GET  /api/status   model, estimator, indexed files, files that were skipped (and why)
    POST /api/chat     {"question": str, "history": [{"role", "content"}...]}  ->  text/event-stream of
                       `retrieval`, `token`* and `citation`* (interleaved), `attribution`, `done` events (or one
                       `error` event)

The `attribution` event is `Attribution.to_dict()` without the prompt, plus `share` per document, `cited_answer`,
`context_scores`, and per answer sentence `earlier_answer` (the history turn it repeats) and `mark`
(`"earlier_answer"`, `"not_from_documents"` or null): see `attribution_payload`. Every sentence carries `grounded`
(nats: how much it depends on the retrieved documents), `supported` and `context_grounded` (how much it depends
on the earlier turns), and the attribution says how they were obtained in `groundedness`: "measured" by default
(one extra teacher-forced pass without the documents, one more without the earlier turns in a conversation),
"estimated" (zero cost, less reliable on documents unlike the estimator's training data) or "off"
(`--groundedness`). Each `citation` event is one answer
sentence's entry of those `citations`, sent as soon as the sentence is complete (`Attributor.stream` with
`sentence_citations=True`); the `attribution` event holds them all again and replaces them.

Requests are bounded before any model work: a question of at most `max_question_chars` characters (HTTP 413
`question_too_long` otherwise) and a history of at most `max_history` messages and `max_history_chars` characters
(413 `history_too_long`). A prompt that still does not fit the context window gets 413 `context_too_long` with a
message saying what to shorten.

Before any route, `security.RequestGuard` refuses requests for host names the server does not serve (421, DNS
rebinding), writes a browser marks as cross-site (403) and JSON bodies over the cap (413). Without `--auth` the
server has no login: it is single-user and local, and says so at start. With `--auth FILE` (`user:token` lines)
every API request needs `Authorization: Bearer <token>` (401 otherwise), and each user has a workspace: their own
uploads plus the shared `--docs` folder (`ChatService.workspace`); another user's upload answers 404.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # `python examples/chatbot/app.py`: import as the `chatbot` package
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from chatbot.app import main

    raise SystemExit(main())

import argparse
import asyncio
import json
import logging
import secrets
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

import at2_rag
from at2_rag import (
    AT2Error,
    Attribution,
    Attributor,
    Citation,
    ContextTooLongError,
    NoDocumentsError,
    get_attributor,
    get_micro_batcher,
)
from at2_rag.attribution.marks import sentence_source
from at2_rag.attribution.result import ContextSource
from at2_rag.evidence.groundedness import GROUNDEDNESS_MODES, GroundednessMode, check_groundedness

from .corpus import BM25Index, LoadReport, load_folder, text_to_passages
from .security import LOOPBACK_NAMES, AuthFileError, RequestGuard, read_tokens
from .uploads import ALLOWED_TYPES, PDF_TIMEOUT_S, UploadError, UploadStore, extract_upload, safe_name

logger = logging.getLogger("at2_rag.chatbot")

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
SAMPLE_DOCS = HERE / "sample_docs"
DEFAULT_TOP_K = 4
DEFAULT_MAX_NEW_TOKENS = 80
DEFAULT_MAX_HISTORY = 6  # earlier messages (user + assistant) a request may carry; all of them reach the model
DEFAULT_MAX_QUESTION_CHARS = 2000  # longer questions are refused (413) before any model work
DEFAULT_MAX_HISTORY_CHARS = 8000  # total characters over the history messages of one request
SAMPLE_QUESTIONS = [
    "How many vacation days do I get per year?",
    "What is the monthly internet allowance?",
    "How many requests per minute does the Canopy API allow?",
]


DEFAULT_MAX_UPLOAD_BYTES = 2 * 1024 * 1024  # per uploaded file
DEFAULT_MAX_UPLOAD_FILES = 10  # per request
DEFAULT_MAX_UPLOADED_DOCUMENTS = 100  # kept at once
# the command line's; create_app's default is a temp folder
DEFAULT_UPLOAD_DIR = Path("~/.cache/at2-rag/chatbot-uploads")


def load_attributor(model: str | None = None, estimator: str | None = None) -> Attributor:
    """The process's shared Attributor for `model` (None: the embedded SmolLM2-135M-Instruct), loaded once:
    `at2_rag.get_attributor`, shared with the LangChain / LlamaIndex adapters in the same process."""
    return get_attributor(model, estimator=estimator)


def load_default_attributor() -> Attributor:
    """The embedded SmolLM2-135M-Instruct with its estimator, loaded once per process."""
    return load_attributor(None)


# ---- request / response shapes ------------------------------------------------------------------------
class Turn(BaseModel):
    role: Literal["user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    question: str = ""
    history: list[Turn] = Field(default_factory=list)
    # True: sample another answer (temperature 0.8) instead of the greedy one, for Regenerate
    regenerate: bool = False


class StopRequest(BaseModel):
    stream_id: str


def error_response(status: int, kind: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message, **extra}, status_code=status)


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def earlier_answer(
    citation: Citation, support_threshold: float, grounded_threshold: float = 1.0
) -> dict[str, Any] | None:
    """The earlier assistant turn an answer sentence is shown as coming from, or None: the core's one rule for what a
    sentence is marked with (`at2_rag.attribution.marks.sentence_source`).

    Measured (the sentence has `context_grounded`: groundedness "measured" in a conversation): removing every
    earlier turn lowers the sentence's log-odds by at least `grounded_threshold` nats, the best earlier turn it lists
    in `context` is an assistant turn, the sentence is in that turn (at least half its words), and when the
    documents matter too (`supported`) the earlier turns matter more (`context_grounded > grounded`). Otherwise
    (estimated or off) the sentence's best context source is such an assistant turn, reaches the support threshold,
    and scores above every retrieved document for that sentence.

    `history_index` is the turn's position in the request's `history` list; the page maps it back to its own
    conversation (it may have sent only the newest turns)."""
    return _earlier_json(citation, sentence_source(citation, support_threshold, grounded_threshold).earlier)


def _earlier_json(citation: Citation, turn: ContextSource | None) -> dict[str, Any] | None:
    if turn is None:
        return None
    out: dict[str, Any] = {
        "history_index": turn.index,
        "score": turn.score,
        "best_document_score": max((d.score for d in citation.documents), default=None),
    }
    if citation.context_grounded is not None:
        out["context_grounded"] = citation.context_grounded
    return out


def sentence_mark(citation: Citation, repeats: dict[str, Any] | None) -> str | None:
    """What the page marks next to the sentence besides document numbers: "earlier_answer" (it comes from an earlier
    reply: `earlier_answer`), "not_from_documents" (not `supported`: removing the documents does not lower it by the
    threshold, and no earlier answer it comes from), or None. Either mark comes without document numbers."""
    if repeats is not None:
        return "earlier_answer"
    if not citation.supported:
        return "not_from_documents"
    return None


def attribution_payload(attribution: Attribution) -> dict[str, Any]:
    """The Attribution as JSON for the page (`Attribution.to_dict()` without the long prompt), plus each
    document's share of the positive attribution mass (for the bars), the answer with [n] marks, the context
    scores, and per answer sentence its `earlier_answer` (see `earlier_answer`) and `mark` (see `sentence_mark`).

    Context sources (here and per sentence) carry kind, index, role and score but not their text: the page sent
    that text as `history` and has it already."""
    data = attribution.to_dict()
    data.pop("prompt", None)
    total = sum(max(0.0, d.score) for d in attribution.documents) or 1.0
    for doc in data["documents"]:
        doc["share"] = max(0.0, doc["score"]) / total
    data["context_scores"] = attribution.context_scores()
    data["context_sources"] = [_context_json(c) for c in attribution.context_sources]
    data["citations"] = [
        citation_payload(cit, attribution.support_threshold, attribution.grounded_threshold)
        for cit in attribution.citations
    ]
    # the answer with the [n] marks the page shows (a sentence from an earlier answer carries none)
    shown = [c.model_copy(update={"cited": out["cited"]}) for c, out in zip(attribution.citations, data["citations"])]
    data["cited_answer"] = attribution.model_copy(update={"citations": shown}).cited_answer()
    return data


def citation_payload(citation: Citation, support_threshold: float, grounded_threshold: float = 1.0) -> dict[str, Any]:
    """One answer sentence's citation as the page gets it, in the `citation` event while the answer streams and
    in the `attribution` event's `citations`: `Citation.model_dump()` (with `grounded`, `supported`,
    `context_grounded`), context sources without their text, plus `earlier_answer` and `mark`.

    One claim per sentence (`at2_rag.attribution.marks.sentence_source`): a sentence marked "earlier_answer" or
    "not_from_documents" carries no document number (`cited` is empty), and document numbers come without a mark."""
    out = citation.model_dump(mode="json")
    out["context"] = [_context_json(c) for c in citation.context]
    source = sentence_source(citation, support_threshold, grounded_threshold)  # one claim per sentence
    out["earlier_answer"] = _earlier_json(citation, source.earlier)
    out["mark"] = source.mark
    out["cited"] = source.cited
    return out


def _context_json(source: ContextSource) -> dict[str, Any]:
    return {"kind": source.kind, "index": source.index, "role": source.role, "score": source.score, "key": source.key}


@dataclass(frozen=True)
class DocumentsView:
    """One consistent state of the documents: the BM25 index, the report and the upload records it was built
    from. Swapped in whole, so a question or a listing never mixes two states."""

    index: BM25Index
    report: LoadReport
    records: dict[str, dict[str, Any]]  # the uploads indexed, oldest first
    counts: dict[str, int] = field(init=False)  # doc id -> passages
    titles: dict[str, str] = field(init=False)  # doc id -> title

    def __post_init__(self) -> None:
        counts: dict[str, int] = {}
        for p in self.report.passages:
            counts[p.doc_id] = counts.get(p.doc_id, 0) + 1
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "titles", {p.doc_id: p.title.rsplit(" (part ", 1)[0] for p in self.report.passages})


class Workspace:
    """The uploads one user sees and changes (everyone's without `--auth`), the lock that serialises their changes,
    and the current view over them plus the server's shared folder."""

    def __init__(self, uploads: UploadStore) -> None:
        self.uploads = uploads
        self.lock = threading.Lock()  # adding and removing documents, one at a time
        self.view: DocumentsView


class _Cancelled:
    """A stopping criterion that ends generation when the browser goes away (or Stop is pressed by its user)."""

    def __init__(self, user: str | None = None) -> None:
        self.event = threading.Event()
        self.user = user  # who asked: only they may stop it

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


# ---- the app -----------------------------------------------------------------------------------------
class ChatService:
    """Corpus + index + model, shared by every request; one answer is generated at a time."""

    def __init__(
        self,
        docs: str | Path,
        attributor: Attributor | None = None,
        attributor_factory: Callable[[], Attributor] = load_default_attributor,
        top_k: int = DEFAULT_TOP_K,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        max_history: int = DEFAULT_MAX_HISTORY,
        system_prompt: str | None = None,
        suggestions: list[str] | None = None,
        max_question_chars: int = DEFAULT_MAX_QUESTION_CHARS,
        max_history_chars: int = DEFAULT_MAX_HISTORY_CHARS,
        upload_dir: str | Path | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        max_upload_files: int = DEFAULT_MAX_UPLOAD_FILES,
        max_uploaded_documents: int = DEFAULT_MAX_UPLOADED_DOCUMENTS,
        model_name: str | None = None,
        groundedness: GroundednessMode = "measured",
        pdf_timeout_s: float = PDF_TIMEOUT_S,
        users: Iterable[str] | None = None,
    ) -> None:
        self.pdf_timeout_s = pdf_timeout_s
        self.groundedness: GroundednessMode = check_groundedness(groundedness)
        if max_question_chars < 1 or max_history < 0 or max_history_chars < 0:
            raise ValueError("max_question_chars must be at least 1; max_history and max_history_chars at least 0")
        self.suggestions = suggestions or []
        self.folder_report: LoadReport = load_folder(docs)
        self.max_upload_bytes = max_upload_bytes
        self.max_upload_files = max_upload_files
        self.max_uploaded_documents = max_uploaded_documents
        # None: no login, one workspace (the upload folder itself); else per-user workspaces in <upload folder>/users/
        self.users: frozenset[str] | None = frozenset(users) if users is not None else None
        self._workspaces: dict[str | None, Workspace] = {}
        self._workspaces_lock = threading.Lock()
        if self.users is None:
            self.uploads = UploadStore(upload_dir)
            self._workspaces[None] = workspace = Workspace(self.uploads)
            self._reindex(workspace)
        else:
            root = Path(upload_dir).expanduser() if upload_dir is not None else Path(
                tempfile.mkdtemp(prefix="at2-chatbot-uploads-")
            )
            self.user_root = root / "users"
        self._attributor = attributor
        self._factory = attributor_factory
        self._load_lock = threading.Lock()
        self.model_name = model_name
        self.top_k = top_k
        self.max_new_tokens = max_new_tokens
        self.max_history = max_history
        self.max_question_chars = max_question_chars
        self.max_history_chars = max_history_chars
        # None: the core's default system prompt (it works best with the small embedded model)
        self.prompt_kwargs: dict[str, Any] = {} if system_prompt is None else {"system_prompt": system_prompt}
        self.generation_lock = asyncio.Lock()
        self.streams: dict[str, _Cancelled] = {}  # stream id -> its stop switch (POST /api/chat/stop)
        for problem in self.folder_report.problems + (self.uploads.problems if self.users is None else []):
            logger.warning("%s %s", problem["file"], problem["error"])

    # ---- documents: the folder's plus the uploaded ones, one BM25 index over both (per workspace) -----------
    def workspace(self, user: str | None = None) -> Workspace:
        """The workspace of `user` (None without `--auth`): with per-user workspaces, created on the user's first
        request, its uploads kept in `<upload folder>/users/<user>/`."""
        if self.users is None:
            return self._workspaces[None]
        if user is None or user not in self.users:
            raise ValueError(f"no workspace for user {user!r}: this server has per-user workspaces")
        with self._workspaces_lock:
            workspace = self._workspaces.get(user)
            if workspace is None:
                workspace = Workspace(UploadStore(self.user_root / user))
                for problem in workspace.uploads.problems:
                    logger.warning("%s (user %s) %s", problem["file"], user, problem["error"])
                self._reindex(workspace)
                self._workspaces[user] = workspace
            return workspace

    def view(self, user: str | None = None) -> DocumentsView:
        return self.workspace(user).view

    @property
    def index(self) -> BM25Index:
        return self.view().index

    @property
    def report(self) -> LoadReport:
        return self.view().report

    def _reindex(self, workspace: Workspace) -> None:
        """Rebuild the passages and the BM25 index from the folder and the workspace's uploads, and swap in a new
        view.

        Called with the workspace's lock held (or when it is created): the view built last always holds every
        stored upload, so a question never sees an index without an acknowledged document."""
        uploads = workspace.uploads
        records = dict(sorted(uploads.records.items(), key=lambda kv: kv[1]["uploaded"]))
        passages = list(self.folder_report.passages)
        for rec in records.values():
            fallback = (
                rec.get("title") or Path(rec["name"]).stem.replace("-", " ").replace("_", " ").strip().capitalize()
            )
            passages.extend(
                text_to_passages(rec["text"], rec["name"], fallback or rec["name"], doc_id=rec["id"], source="upload")
            )
        report = LoadReport(
            folder=self.folder_report.folder,
            passages=passages,
            files=self.folder_report.files + [r["name"] for r in records.values()],
            problems=self.folder_report.problems + uploads.problems,
            texts=self.folder_report.texts,
        )
        workspace.view = DocumentsView(BM25Index(passages), report, records)

    def documents(self, user: str | None = None) -> list[dict[str, Any]]:
        """Every document `user` sees: the folder's files (read-only) and their uploads (removable), from one
        view."""
        view = self.view(user)
        out = []
        for rel in self.folder_report.files:
            text = self.folder_report.texts[rel]
            out.append({
                "id": rel, "name": rel, "title": view.titles.get(rel, rel), "source": "folder", "removable": False,
                "kind": "markdown" if rel.lower().endswith((".md", ".markdown")) else "text",
                "bytes": len(text.encode("utf-8")), "chars": len(text), "passages": view.counts.get(rel, 0),
            })
        out.extend(self._upload_json(rec, view) for rec in view.records.values())
        return out

    @staticmethod
    def _upload_json(rec: dict[str, Any], view: DocumentsView, duplicate: bool = False) -> dict[str, Any]:
        return {
            "id": rec["id"], "name": rec["name"], "title": view.titles.get(rec["id"]) or rec["name"],
            "source": "upload", "removable": True, "kind": rec["kind"], "bytes": rec["bytes"], "chars": rec["chars"],
            "passages": view.counts.get(rec["id"], 0), "uploaded": rec["uploaded"], "duplicate": duplicate,
        }

    def document_text(self, doc_id: str, user: str | None = None) -> dict[str, Any] | None:
        """The whole text of one document and where its passages lie in it (for the page's document view); None
        when `user` does not see it."""
        view = self.view(user)
        if doc_id in self.folder_report.texts:
            text = self.folder_report.texts[doc_id]
        elif doc_id in view.records:
            text = view.records[doc_id]["text"]
        else:
            return None
        info = next(d for d in self.documents(user) if d["id"] == doc_id)
        info.pop("duplicate", None)
        passages = [
            {"id": p.id, "offset": p.offset, "length": len(p.text)} for p in view.report.passages if p.doc_id == doc_id
        ]
        return {**info, "text": text, "passage_spans": passages}

    def add_uploads(
        self, items: list[dict[str, Any]], user: str | None = None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Store and index extracted uploads in `user`'s workspace as one step: under the workspace's lock, check
        the limit (per workspace), write each record, rebuild the index, and build the answer from that index.
        Returns (documents, rejected).

        A document already stored under the same name with the same content (a retried upload) is answered with
        its stored record (`duplicate: true`) instead of being stored twice, and does not count against the
        limit. If indexing fails, the records written by this call are removed again (all or nothing)."""
        workspace = self.workspace(user)
        uploads = workspace.uploads
        with workspace.lock:
            answered: list[tuple[dict[str, Any], bool]] = []
            rejected: list[dict[str, Any]] = []
            new: list[dict[str, Any]] = []
            for item in items:
                existing = uploads.find(item["name"], item["text"])
                if existing is not None:
                    answered.append((existing, True))
                    continue
                if len(uploads) >= self.max_uploaded_documents:
                    rejected.append({
                        "name": item["name"], "status": 409, "error": "too_many_documents",
                        "message": f"{item['name']}: the server keeps at most {self.max_uploaded_documents} "
                        "uploaded documents; remove some first.",
                    })
                    continue
                rec = uploads.add(item)
                new.append(rec)
                answered.append((rec, False))
            if new:
                try:
                    self._reindex(workspace)
                except BaseException:
                    for rec in new:
                        uploads.remove(rec["id"])
                    logger.exception("indexing the uploads failed; the %d new document(s) were removed", len(new))
                    raise
            view = workspace.view
            return [self._upload_json(rec, view, duplicate) for rec, duplicate in answered], rejected

    def remove_upload(self, doc_id: str, user: str | None = None) -> bool:
        """Delete one of `user`'s uploads and reindex, serialised with their uploads (the workspace's lock).
        False when `user` has no upload with this id (another user's included)."""
        workspace = self.workspace(user)
        with workspace.lock:
            removed = workspace.uploads.remove(doc_id)
            if removed:
                self._reindex(workspace)
            return removed

    @property
    def attributor(self) -> Attributor:
        if self._attributor is None:
            with self._load_lock:
                if self._attributor is None:
                    self._attributor = self._factory()
        return self._attributor

    @property
    def grounded_threshold(self) -> float:
        """Nats: a sentence depends on the documents (or on the earlier turns) when removing them lowers it by
        this much (`Attribution.grounded_threshold`, for the citations sent while the answer streams)."""
        return float(self.attributor.scorer.groundedness(refined=False).threshold)

    def no_documents_message(self, user: str | None = None) -> str | None:
        report = self.view(user).report
        if report.passages:
            return None
        return (
            f"No documents are indexed: {report.folder} contains no readable .txt or .md files. "
            "Upload documents with the Documents button, or start the app with --docs pointing at a folder of "
            "text files."
        )

    def status(self, user: str | None = None) -> dict[str, Any]:
        att = self._attributor
        view = self.view(user)
        report = view.report
        return {
            "folder": report.folder,
            "files": report.files,
            "num_files": len(report.files),
            "num_passages": len(report.passages),
            "problems": report.problems,
            "error": self.no_documents_message(user),
            "model_loaded": att is not None,
            "model": att.model_id if att is not None else (self.model_name or at2_rag.models.DEFAULT_MODEL_ID),
            "estimator_trained": att.estimator.trained if att is not None else None,
            "estimator": repr(att.estimator) if att is not None else None,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
            "groundedness": self.groundedness,
            "max_question_chars": self.max_question_chars,
            "max_history": self.max_history,
            "max_history_chars": self.max_history_chars,
            "suggestions": self.suggestions if report.passages else [],
            "num_uploads": len(view.records),
            "auth": self.users is not None,
            "user": user,
            "max_upload_bytes": self.max_upload_bytes,
            "max_upload_files": self.max_upload_files,
            "max_uploaded_documents": self.max_uploaded_documents,
            "upload_types": list(ALLOWED_TYPES),
        }

    def retrieve(self, question: str, history: list[dict[str, str]], user: str | None = None) -> list[Any]:
        """Top-k passages for the question from what `user` sees (the folder and their uploads); a follow-up that
        matches nothing borrows the earlier questions' words."""
        index = self.view(user).index
        hits = index.search(question, self.top_k)
        if not hits:
            earlier = " ".join(t["content"] for t in history if t["role"] == "user")
            if earlier:
                hits = index.search(f"{question} {earlier}", self.top_k)
        return [p.to_document(score, rank) for rank, (p, score) in enumerate(hits, 1)]

    def question_too_long(self, question: str) -> JSONResponse | None:
        """The 413 for a question over the limit (a length check: no tokenizer, no model)."""
        if len(question) <= self.max_question_chars:
            return None
        return error_response(
            413,
            "question_too_long",
            f"Your question is {len(question):,} characters long; the limit is {self.max_question_chars:,}. "
            "Please shorten it and send it again.",
            length=len(question),
            limit=self.max_question_chars,
        )

    def history_too_long(self, history: list[Turn]) -> JSONResponse | None:
        """The 413 for a history with more messages or characters than a request may carry."""
        chars = sum(len(t.content) for t in history)
        if len(history) <= self.max_history and chars <= self.max_history_chars:
            return None
        return error_response(
            413,
            "history_too_long",
            f"The conversation sent with the question is too long ({plural(len(history), 'earlier message')}, "
            f"{plural(chars, 'character')}); this server accepts at most {plural(self.max_history, 'message')} "
            f"and {plural(self.max_history_chars, 'character')} of history. "
            "Start a New chat, or send only the most recent turns.",
            messages=len(history),
            chars=chars,
            max_messages=self.max_history,
            max_chars=self.max_history_chars,
        )

    def check_fits(self, question: str, documents: list[Any], history: list[dict[str, str]]) -> None:
        """Raise ContextTooLongError before streaming if the prompt plus the answer cannot fit."""
        att = self.attributor
        att.runner.check_fits(att.render(question, documents, history, **self.prompt_kwargs), self.max_new_tokens)

    def context_too_long_message(
        self, exc: ContextTooLongError, question: str, documents: list[Any], history: list[dict[str, str]]
    ) -> str:
        """What a person can do about a prompt that does not fit: a shorter question, or a new chat when the
        earlier turns are what tips it over (the prompt without them fits)."""
        sizes = (
            f"about {exc.needed:,} tokens with room for the answer, but the model reads at most {exc.limit:,} "
            f"({exc.needed - exc.limit:,} too many)"
        )
        if history:
            try:
                self.check_fits(question, documents, [])
            except ContextTooLongError:
                pass
            else:
                return (
                    "This conversation has grown too long for the model: the question, the earlier turns and the "
                    f"retrieved documents need {sizes}. Start a New chat to drop the earlier turns, or ask a "
                    "shorter question."
                )
        return (
            "Your question is too long for the model to read together with the retrieved documents: they need "
            f"{sizes}. Please shorten the question."
        )


def create_app(
    docs: str | Path = SAMPLE_DOCS,
    attributor: Attributor | None = None,
    attributor_factory: Callable[[], Attributor] = load_default_attributor,
    top_k: int = DEFAULT_TOP_K,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_history: int = DEFAULT_MAX_HISTORY,
    max_question_chars: int = DEFAULT_MAX_QUESTION_CHARS,
    max_history_chars: int = DEFAULT_MAX_HISTORY_CHARS,
    upload_dir: str | Path | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_upload_files: int = DEFAULT_MAX_UPLOAD_FILES,
    max_uploaded_documents: int = DEFAULT_MAX_UPLOADED_DOCUMENTS,
    model_name: str | None = None,
    groundedness: GroundednessMode = "measured",
    pdf_timeout_s: float = PDF_TIMEOUT_S,
    allowed_hosts: Iterable[str] | None = None,
    max_json_bytes: int | None = None,
    auth: Mapping[str, str] | None = None,
) -> FastAPI:
    """The FastAPI app. Pass `attributor` to share an already loaded model; otherwise it loads on first use.

    A request may carry a question of at most `max_question_chars` characters and at most `max_history` earlier
    messages of `max_history_chars` characters in all; larger ones get HTTP 413 before any model work.

    Uploaded documents are kept in `upload_dir` (a temporary folder when None): at most `max_upload_files` files
    of `max_upload_bytes` each per request, `max_uploaded_documents` in all. `model_name` is what the page shows
    before the model has loaded. A PDF's text is extracted in a child process that is stopped after
    `pdf_timeout_s` seconds (the upload is refused with 413 `pdf_too_complex`).

    Every request's Host must be one of `allowed_hosts` ("name" for any port, or "name:port"; default: the
    loopback names 127.0.0.1, localhost and ::1), and writes a browser marks as cross-site are refused (403): see
    `security.RequestGuard`. A JSON body may have at most `max_json_bytes` bytes (default: room for the largest
    question and history the limits allow); larger ones get 413 `request_too_large` before they are parsed.

    `auth` ({user: token}, e.g. `security.read_tokens(FILE)`) turns on per-user workspaces: every `/api/` request
    needs `Authorization: Bearer <token>` (401 otherwise), and each user sees, searches, reads and removes only
    their own uploads (kept in `upload_dir/users/<user>/`, at most `max_uploaded_documents` each) plus the folder's
    documents (shared, read-only); another user's upload answers 404. None (the default): no login, one workspace.

    `groundedness` says how each answer sentence's `grounded` (its dependence on the retrieved documents, not its
    truth) is obtained: "measured" (the default: one extra teacher-forced pass over the non-document part of the
    prompt and the answer, one more without the earlier turns in a conversation), "estimated" (zero cost, less
    reliable on documents unlike the estimator's training data) or "off" (no "not from your documents" marks).
    The "not from your documents" and "from the earlier answer" marks stand on it."""
    is_sample = Path(docs).expanduser().resolve() == SAMPLE_DOCS
    service = ChatService(
        docs,
        attributor,
        attributor_factory,
        top_k,
        max_new_tokens,
        max_history,
        suggestions=SAMPLE_QUESTIONS if is_sample else None,
        max_question_chars=max_question_chars,
        max_history_chars=max_history_chars,
        upload_dir=upload_dir,
        max_upload_bytes=max_upload_bytes,
        max_upload_files=max_upload_files,
        max_uploaded_documents=max_uploaded_documents,
        model_name=model_name,
        groundedness=groundedness,
        pdf_timeout_s=pdf_timeout_s,
        users=list(auth) if auth is not None else None,
    )
    app = FastAPI(title="AT2 citation chatbot", docs_url="/api/docs", redoc_url=None)
    app.state.service = service
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if max_json_bytes is None:  # JSON escapes may take 6 bytes a character; room for the envelope too
        max_json_bytes = 64 * 1024 + 6 * (max_question_chars + max_history_chars) + 256 * max_history
    app.add_middleware(
        RequestGuard,
        allowed_hosts=list(allowed_hosts) if allowed_hosts is not None else list(LOOPBACK_NAMES),
        max_body_bytes=max_json_bytes,
        tokens=dict(auth) if auth is not None else None,
    )

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        broken = next((e for e in errors if e["type"] == "json_invalid"), None)
        if broken is not None:  # loc is ("body", character offset)
            where = broken["loc"][1] if len(broken["loc"]) > 1 else 0
            reason = (broken.get("ctx") or {}).get("error") or "not valid JSON"
            return error_response(
                400, "invalid_json",
                f"The request body is not valid JSON (at character {where}: {reason}). Send a JSON object such "
                'as {"question": "...", "history": []}.',
            )
        if any(e["type"] == "model_attributes_type" and tuple(e["loc"]) == ("body",) for e in errors):
            return error_response(
                400, "invalid_json",
                'The request body must be a JSON object such as {"question": "...", "history": []}, sent with '
                "Content-Type: application/json.",
            )
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors)
        return error_response(422, "invalid_request", f"The request is malformed: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(404, "not_found", f"There is nothing at {request.url.path}.")
        if exc.status_code == 405:
            return error_response(
                405, "method_not_allowed", f"{request.method} is not accepted at {request.url.path}.",
            )
        return error_response(exc.status_code, "http_error", str(exc.detail))

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/status")
    async def status(request: Request) -> dict[str, Any]:
        return service.status(_user(request))

    @app.get("/api/documents")
    async def list_documents(request: Request) -> dict[str, Any]:
        return {"documents": service.documents(_user(request)), **_upload_limits(service)}

    @app.get("/api/documents/{doc_id:path}")
    async def get_document(doc_id: str, request: Request) -> Any:
        doc = service.document_text(doc_id, _user(request))
        if doc is None:
            return error_response(404, "not_found", "This document is no longer indexed (it may have been removed).")
        return doc

    @app.delete("/api/documents/{doc_id:path}")
    async def delete_document(doc_id: str, request: Request) -> Any:
        user = _user(request)
        if doc_id in service.folder_report.texts:
            return error_response(
                403,
                "read_only",
                "This document comes from the server's folder; only uploaded documents can be removed here.",
            )
        if not await run_in_threadpool(service.remove_upload, doc_id, user):
            return error_response(
                404, "not_found", "No uploaded document has this id (it may have been removed already)."
            )
        return {"deleted": doc_id, "num_documents": len(service.documents(user))}

    @app.post("/api/documents", status_code=201)
    async def upload_documents(request: Request) -> Any:
        return await _upload(service, request)

    @app.post("/api/chat/stop")
    async def stop(body: StopRequest, request: Request) -> Any:
        cancel = service.streams.get(body.stream_id)
        if cancel is None or cancel.user != _user(request):  # another user's answer: as if it were not there
            return error_response(404, "not_found", "This answer has already finished.")
        cancel.event.set()
        return {"stopped": body.stream_id}

    @app.post("/api/chat")
    async def chat(body: ChatRequest, request: Request) -> Any:
        question = body.question.strip()
        if not question:
            return error_response(400, "empty_question", "Please type a question before sending.")
        refusal = service.question_too_long(question) or service.history_too_long(body.history)
        if refusal is not None:  # before retrieval and the model: an over-long request costs nothing
            return refusal
        user = _user(request)
        no_documents = service.no_documents_message(user)
        if no_documents:
            return error_response(503, "no_documents", no_documents)
        history = [t.model_dump() for t in body.history]
        documents = service.retrieve(question, history, user)
        if not documents:
            return error_response(
                404,
                "no_match",
                "None of the indexed documents contains the words of your question. Try other keywords.",
            )
        try:
            await run_in_threadpool(service.check_fits, question, documents, history)
        except ContextTooLongError as exc:
            message = await run_in_threadpool(service.context_too_long_message, exc, question, documents, history)
            return error_response(
                413, "context_too_long", message, needed_tokens=exc.needed, context_window=exc.limit, detail=str(exc)
            )
        except NoDocumentsError as exc:
            return error_response(503, "no_documents", str(exc))
        except AT2Error as exc:
            return error_response(400, "invalid_input", str(exc))
        return StreamingResponse(
            _events(service, question, documents, history, regenerate=body.regenerate, user=user),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


async def _upload(service: ChatService, request: Request) -> Any:
    """POST /api/documents: multipart with one or more `file` fields. Every file is checked on its own: the
    accepted ones are indexed at once (201, `documents`), the refused ones are listed with the reason
    (`rejected`). When none is accepted, the first refusal's status and message answer the request.

    Files are extracted first (outside the lock: a PDF may take seconds); the limit, the writes and the index
    then change together in `ChatService.add_uploads`. A retry of stored files answers 200 (`duplicate`)."""
    limits = _upload_limits(service)
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        return error_response(415, "not_multipart", "Send the files as multipart/form-data, in fields named `file`.")
    declared = request.headers.get("content-length")
    budget = service.max_upload_files * (service.max_upload_bytes + 64 * 1024) + 64 * 1024
    if declared is None or not declared.isdigit():
        return error_response(411, "length_required", "The upload must say its size (Content-Length).")
    if int(declared) > budget:
        return error_response(
            413, "upload_too_large",
            f"This upload is too large: at most {service.max_upload_files} files of "
            f"{_size_words(service.max_upload_bytes)} each can be sent at once.",
            **limits,
        )
    try:
        form = await request.form(max_files=service.max_upload_files + 1, max_fields=20)
    except (MultiPartException, StarletteHTTPException) as exc:  # malformed, over max_files or max_fields
        problem = str(getattr(exc, "detail", None) or exc)  # Starlette wraps MultiPartException in a 400
        if "too many files" in problem.lower():
            return error_response(
                413, "too_many_files", f"At most {service.max_upload_files} files can be uploaded at once; "
                f"you sent more than {service.max_upload_files}.", **limits,
            )
        return error_response(400, "bad_upload", f"The upload could not be read ({problem}). Send at most "
                              f"{service.max_upload_files} files in fields named `file`.", **limits)
    except Exception as exc:  # a body that is not valid multipart at all
        return error_response(400, "bad_upload", f"The upload could not be read as multipart/form-data "
                              f"({type(exc).__name__}). Send the files in fields named `file`.", **limits)
    try:
        files = [f for f in form.getlist("file") if hasattr(f, "read")]
        if not files:
            return error_response(400, "no_file", "Choose at least one file to upload (.txt, .md or .pdf).", **limits)
        if len(files) > service.max_upload_files:
            return error_response(
                413, "too_many_files", f"At most {service.max_upload_files} files can be uploaded at once; "
                f"you sent {len(files)}.", **limits,
            )
        extracted: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        for f in files:
            name = safe_name(f.filename)
            raw = await f.read(service.max_upload_bytes + 1)
            try:
                extracted.append(await run_in_threadpool(
                    extract_upload, name, raw, service.max_upload_bytes, pdf_timeout_s=service.pdf_timeout_s
                ))
            except UploadError as exc:
                rejected.append({"name": name, "status": exc.status, "error": exc.kind, "message": exc.message})
    finally:
        await form.close()
    # the limit is checked, the records written and the index rebuilt under one lock (ChatService.add_uploads)
    user = _user(request)
    documents, full = await run_in_threadpool(service.add_uploads, extracted, user) if extracted else ([], [])
    rejected.extend(full)
    if not documents:
        first = rejected[0]
        return error_response(first["status"], first["error"], first["message"], rejected=rejected, **limits)
    fresh = any(not d["duplicate"] for d in documents)  # a retry that stored nothing new is a 200
    return JSONResponse(
        {"documents": documents, "rejected": rejected, "num_documents": len(service.documents(user))},
        status_code=201 if fresh else 200,
    )


def _user(request: Request) -> str | None:
    """The user `security.RequestGuard` found for the request's token (None without `--auth`)."""
    return getattr(request.state, "user", None)


def _upload_limits(service: ChatService) -> dict[str, Any]:
    return {
        "max_upload_bytes": service.max_upload_bytes,
        "max_upload_files": service.max_upload_files,
        "max_uploaded_documents": service.max_uploaded_documents,
        "upload_types": list(ALLOWED_TYPES),
    }


def _size_words(n: int) -> str:
    return f"{n / (1024 * 1024):g} MB" if n >= 1024 * 1024 else f"{n / 1024:g} KB"


async def _events(
    service: ChatService,
    question: str,
    documents: list[Any],
    history: list[dict[str, str]],
    regenerate: bool = False,
    user: str | None = None,
) -> AsyncIterator[str]:
    retrieved = [
        {
            "id": d.id, "title": d.title, "path": d.metadata["path"], "bm25": d.metadata["bm25"],
            "rank": d.metadata["bm25_rank"], "doc_id": d.metadata["doc_id"],
        }
        for d in documents
    ]
    cancel = _Cancelled(user)
    stream_id = secrets.token_urlsafe(12)
    service.streams[stream_id] = cancel
    yield sse("retrieval", {"documents": retrieved, "stream_id": stream_id})
    end = object()
    started = time.perf_counter()
    sampling: dict[str, Any] = {"do_sample": True, "temperature": 0.8, "top_p": 0.95} if regenerate else {}
    try:
        if service.generation_lock.locked():
            # the model is streaming someone else's answer: wait in the core's micro-batcher, where every question
            # that queues meanwhile joins one batched generation once the model is free (answers come whole)
            yield sse("status", {"message": "Waiting for the model (another answer is being generated)…"})
            request = {"query": question, "documents": documents, "history": history, **service.prompt_kwargs}
            batcher = get_micro_batcher(service.attributor)
            future = batcher.submit(request, service.max_new_tokens, groundedness=service.groundedness, **sampling)
            attribution = await asyncio.wrap_future(future)
            yield sse("token", {"text": attribution.answer})
            for citation in attribution.citations:
                yield sse(
                    "citation",
                    citation_payload(citation, attribution.support_threshold, attribution.grounded_threshold),
                )
            payload = attribution_payload(attribution)
            payload["stopped"], payload["sampled"], payload["batched"] = False, regenerate, True
            yield sse("attribution", payload)
            yield sse("done", {"seconds": round(time.perf_counter() - started, 2), "history_messages": len(history)})
            return
        async with service.generation_lock:
            from transformers import StoppingCriteriaList

            stream = service.attributor.stream(
                question,
                documents,
                history=history,
                **service.prompt_kwargs,
                max_new_tokens=service.max_new_tokens,
                sentence_citations=True,
                groundedness=service.groundedness,
                stopping_criteria=StoppingCriteriaList([cancel]),
                **sampling,
            )
            while True:
                item = await run_in_threadpool(next, stream, end)
                if item is end:
                    break
                if isinstance(item, Attribution):
                    payload = attribution_payload(item)
                    payload["stopped"] = cancel.event.is_set()
                    payload["sampled"] = regenerate
                    yield sse("attribution", payload)
                elif isinstance(item, Citation):  # a sentence just completed: its marks can show now
                    yield sse(
                        "citation",
                        citation_payload(item, service.attributor.support_threshold, service.grounded_threshold),
                    )
                else:
                    yield sse("token", {"text": item})
        yield sse("done", {"seconds": round(time.perf_counter() - started, 2), "history_messages": len(history)})
    except ContextTooLongError as exc:
        message = await run_in_threadpool(service.context_too_long_message, exc, question, documents, history)
        yield sse("error", {"error": "context_too_long", "message": message, "detail": str(exc)})
    except AT2Error as exc:
        yield sse("error", {"error": "invalid_input", "message": str(exc)})
    except (asyncio.CancelledError, GeneratorExit):
        cancel.event.set()  # the page went away: stop generating so the next question is not kept waiting
        logger.info("the client went away: generation stopped")
        raise
    except Exception as exc:  # keep the page informative instead of a silently broken stream
        logger.exception("generation failed")
        yield sse("error", {"error": "internal", "message": f"Generation failed: {type(exc).__name__}: {exc}"})
    finally:
        service.streams.pop(stream_id, None)


# ---- command line ----------------------------------------------------------------------------------------
def served_names(host: str, port: int, extra: Iterable[str] = ()) -> list[str]:
    """The Host header values the server accepts: the loopback names on `port`, `--host` itself when it is a
    name (not a wildcard address), and each `--allowed-host` (with `port` unless it names one)."""
    names = [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"]
    if host not in ("0.0.0.0", "::", "", *LOOPBACK_NAMES):
        names.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    for name in extra:
        has_port = name.rpartition(":")[2].isdigit() and (not name.startswith("[") or "]:" in name)
        names.append(name if has_port else f"{name}:{port}")
    return names


def log_exposure(host: str, port: int, extra: Iterable[str] = (), users: Iterable[str] | None = None) -> None:
    """Say at start who can reach the server: without `--auth` there is no login, so it is a single-user, local
    server; with it, who has a workspace (never their tokens)."""
    if users is not None:
        names = sorted(users)
        logger.info(
            "Per-user workspaces (--auth): %s. Every API request needs `Authorization: Bearer <token>`; each user sees "
            "only their own uploads and the shared folder. Requests must name %s; browser writes from other sites "
            "are refused.", ", ".join(names), ", ".join(served_names(host, port, extra)),
        )
        if host not in LOOPBACK_NAMES:
            logger.warning(
                "Listening on %s, not only on this machine, over plain HTTP: tokens cross the network unencrypted "
                "unless a TLS reverse proxy stands in front.", host,
            )
        return
    logger.info(
        "Single-user and local: no login (no --auth); every client that reaches %s:%d can ask questions and "
        "read, add and remove the uploaded documents. Requests must name %s; browser writes from other sites are "
        "refused.", host, port, ", ".join(served_names(host, port, extra)),
    )
    if host not in LOOPBACK_NAMES:
        logger.warning(
            "Listening on %s, not only on this machine: anyone on the network who can reach port %d can use it.",
            host, port,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python examples/chatbot/app.py",
        description="Citation-grounded chatbot over a folder of .txt/.md files (AT2 attribution, BM25 retrieval).",
    )
    parser.add_argument(
        "--docs", default=str(SAMPLE_DOCS), help="folder of .txt/.md files (default: the bundled sample_docs)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--allowed-host", action="append", default=[], metavar="NAME",
        help="another name the server answers to (repeatable), e.g. the machine's name behind --host 0.0.0.0 or "
        "a reverse proxy's; requests whose Host header names anything else get HTTP 421 (DNS rebinding)",
    )
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="documents retrieved per question (default 4)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="answer length limit (default 80)"
    )
    parser.add_argument(
        "--max-question-chars",
        type=int,
        default=DEFAULT_MAX_QUESTION_CHARS,
        help="longest question accepted, in characters; longer ones get HTTP 413 "
        f"(default {DEFAULT_MAX_QUESTION_CHARS})",
    )
    parser.add_argument(
        "--max-history",
        type=int,
        default=DEFAULT_MAX_HISTORY,
        help=f"earlier messages (user and assistant) a question may carry to the model (default {DEFAULT_MAX_HISTORY})",
    )
    parser.add_argument(
        "--max-history-chars",
        type=int,
        default=DEFAULT_MAX_HISTORY_CHARS,
        help=f"characters over those earlier messages (default {DEFAULT_MAX_HISTORY_CHARS})",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="a local Hugging Face causal LM (folder) or its id in the local cache; default: the embedded "
        "SmolLM2-135M-Instruct",
    )
    parser.add_argument(
        "--estimator",
        default=None,
        help="AT2 estimator for --model (folder, file or id); default: the one shipped for the model, else "
        "average attention (untrained)",
    )
    parser.add_argument(
        "--upload-dir",
        default=str(DEFAULT_UPLOAD_DIR),
        help=f"where documents uploaded from the page are kept (default {DEFAULT_UPLOAD_DIR})",
    )
    parser.add_argument(
        "--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / (1024 * 1024),
        help="largest uploaded file, in MB (default 2)",
    )
    parser.add_argument(
        "--pdf-timeout", type=float, default=PDF_TIMEOUT_S,
        help=f"seconds a PDF's text may take to extract before the upload is refused (default {PDF_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--groundedness",
        choices=GROUNDEDNESS_MODES,
        default="measured",
        help="how each sentence's dependence on the documents is found (the 'not from your documents' and 'from "
        "the earlier answer' marks): measured (default; one extra pass without the documents per answer, one more "
        "without the earlier turns in a conversation), estimated (no extra pass, less reliable on documents unlike "
        "the estimator's training data) or off",
    )
    parser.add_argument(
        "--auth", default=None, metavar="FILE",
        help="per-user workspaces: a file of `user:token` lines (tokens of at least 16 characters); every API request "
        "then needs `Authorization: Bearer <token>` and each user sees only their own uploads plus the --docs folder. "
        "Default: no login (single-user and local)",
    )
    args = parser.parse_args(argv)
    tokens = None
    if args.auth is not None:
        try:
            tokens = read_tokens(args.auth)
        except AuthFileError as exc:
            parser.error(f"--auth: {exc}")
    if args.max_upload_mb <= 0:
        parser.error("--max-upload-mb must be positive")
    if args.pdf_timeout <= 0:
        parser.error("--pdf-timeout must be positive")
    if not Path(args.docs).expanduser().is_dir():
        parser.error(f"--docs {args.docs!r} is not a folder")
    if args.top_k < 1 or args.max_new_tokens < 1:
        parser.error("--top-k and --max-new-tokens must be at least 1")
    if args.max_question_chars < 1:
        parser.error("--max-question-chars must be at least 1")
    if args.max_history < 0 or args.max_history_chars < 0:
        parser.error("--max-history and --max-history-chars must be at least 0")

    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import bm25s  # noqa: F401  (it sets its own logger to DEBUG on import: quiet it afterwards)

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    print(f"Loading the model ({args.model or 'SmolLM2-135M-Instruct, embedded'}) …", flush=True)
    try:
        if args.model is None and args.estimator is None:
            attributor = load_default_attributor()
        else:
            attributor = load_attributor(args.model, args.estimator)
    except Exception as exc:
        parser.exit(2, f"could not load the model {args.model or 'default'!r}: {type(exc).__name__}: {exc}\n")
    app = create_app(
        args.docs,
        attributor=attributor,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        max_history=args.max_history,
        max_question_chars=args.max_question_chars,
        max_history_chars=args.max_history_chars,
        upload_dir=args.upload_dir,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        model_name=getattr(attributor, "model_id", None),
        groundedness=args.groundedness,
        pdf_timeout_s=args.pdf_timeout,
        allowed_hosts=served_names(args.host, args.port, args.allowed_host),
        auth=tokens,
    )
    folder = app.state.service.folder_report  # with --auth, each user's uploads are indexed on their first request
    print(f"Indexed {len(folder.passages)} passage(s) from {len(folder.files)} file(s) in {folder.folder}")
    if folder.problems:
        print(f"  {len(folder.problems)} file(s) skipped (listed above and in the page's status area)")
    if tokens is None and app.state.service.no_documents_message():
        print(f"  {app.state.service.no_documents_message()}")
    log_exposure(args.host, args.port, args.allowed_host, users=list(tokens) if tokens else None)
    print(f"Open http://{args.host}:{args.port}/ in your browser (Ctrl+C to stop)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
