"""The chat service: the documents (the server's folder plus each workspace's uploads, one BM25 index per
workspace), the model (loaded once, shared), retrieval, the request limits and the context-window check."""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse

import at2_rag.models
from at2_rag import Attributor, ContextTooLongError, Prepared, get_attributor
from at2_rag.evidence.groundedness import GroundednessMode, check_groundedness

from .corpus import BM25Index, LoadReport, load_folder, text_to_passages
from .schema import Turn, error_response, plural
from .streaming import Cancelled
from .uploads import ALLOWED_TYPES, PDF_TIMEOUT_S, UploadStore

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



class ChatService:
    """Corpus + index + model, shared by every request. The model runs one thing at a time under its own lock
    (`Attributor.lock`); questions that arrive while it is busy wait in the core's micro-batcher (`streaming`)."""

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
        self.streams: dict[str, Cancelled] = {}  # stream id -> its stop switch (POST /api/chat/stop)
        # one answer streams alone at a time (taken and freed in the event loop): the chatbot's policy of who streams
        # alone and who batches, not a model lock (the core's `Attributor.lock` serialises the model)
        self.stream_slot = threading.Lock()
        self.slot_freed_at = 0.0  # time.monotonic() when the last answer that streamed alone ended
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
        return self.attributor.grounded_threshold

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

    def prepare(
        self, question: str, documents: list[Any], history: list[dict[str, str]], regenerate: bool = False
    ) -> Prepared:
        """The question prepared once (`Attributor.prepare`: every check, ContextTooLongError before streaming if the
        prompt plus the answer cannot fit); the streamed and the batched answer both run this `Prepared`.
        Regenerate samples (temperature 0.8, top-p 0.95) instead of the greedy answer."""
        sampling: dict[str, Any] = {"do_sample": True, "temperature": 0.8, "top_p": 0.95} if regenerate else {}
        return self.attributor.prepare(
            question, documents, history, **self.prompt_kwargs, max_new_tokens=self.max_new_tokens, **sampling
        )

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
                self.prepare(question, documents, [])
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

