"""The HTTP side: `create_app` builds the FastAPI app (the security guard, the error bodies, every route) over one
`ChatService`; `upload` reads a multipart upload and hands the extracted files to the service.

    GET    /                         the page (static/index.html)
    GET    /api/status               model, estimator, indexed files, skipped files (and why), limits
    GET    /api/documents            every document the user sees; GET/DELETE /api/documents/{id}: one
    POST   /api/documents            multipart `file` fields: upload .txt/.md/.pdf
    POST   /api/chat                 {"question", "history", "regenerate"} -> text/event-stream (`streaming`)
    POST   /api/chat/stop            {"stream_id"}: stop one's own answer
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from at2_rag import AT2Error, Attributor, ContextTooLongError, NoDocumentsError
from at2_rag.evidence.groundedness import GroundednessMode

from .schema import ChatRequest, StopRequest, error_response
from .security import LOOPBACK_NAMES, RequestGuard
from .service import (
    DEFAULT_MAX_HISTORY,
    DEFAULT_MAX_HISTORY_CHARS,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_QUESTION_CHARS,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_MAX_UPLOAD_FILES,
    DEFAULT_MAX_UPLOADED_DOCUMENTS,
    DEFAULT_TOP_K,
    SAMPLE_DOCS,
    SAMPLE_QUESTIONS,
    STATIC,
    ChatService,
    load_default_attributor,
)
from .streaming import events
from .uploads import ALLOWED_TYPES, PDF_TIMEOUT_S, UploadError, extract_upload, safe_name


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
        return await upload(service, request)

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
            prepared = await run_in_threadpool(service.prepare, question, documents, history, body.regenerate)
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
            events(service, prepared, documents, history, regenerate=body.regenerate, user=user),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


async def upload(service: ChatService, request: Request) -> Any:
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


