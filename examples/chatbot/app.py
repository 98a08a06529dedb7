"""A citation-grounded chatbot: BM25 retrieval over a folder of .txt/.md files, answers streamed from the
model, and AT2 attribution turned into per-sentence citations with highlighted supporting sentences.

Start it from the repository root:

    python examples/chatbot/app.py [--docs FOLDER] [--port 8000]      (or: python -m examples.chatbot)

The page is plain HTML/CSS/JS in `static/`; the API is:

    GET  /api/status   model, estimator, indexed files, files that were skipped (and why)
    POST /api/chat     {"question": str, "history": [{"role", "content"}...]}  ->  text/event-stream of
                       `retrieval`, `token`* and `citation`* (interleaved), `attribution`, `done` events (or one
                       `error` event)

The `attribution` event is `Attribution.to_dict()` without the prompt, plus `share` per document, `cited_answer`,
`context_scores`, and per answer sentence `earlier_answer` (the history turn it repeats) and `mark`
(`"earlier_answer"`, `"not_from_documents"` or null): see `citations.attribution_payload`; which one a sentence
gets is the core's rule, `at2_rag.attribution.marks.sentence_source`. Every sentence carries `grounded`
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

The modules, by job:

    service.py     ChatService: documents and workspaces, the model, retrieval, limits, the context-window check
    routes.py      create_app: the FastAPI app, its routes, error bodies and the upload handler
    streaming.py   the answer as server-sent events (streamed, or micro-batched while the model is busy)
    citations.py   the Attribution and each sentence's citation as the page's JSON
    schema.py      request shapes and the JSON error body
    cli.py         the command line (main)
    uploads.py     the upload store and text extraction;  corpus.py  the folder and BM25;  security.py  the guard

This module is the entry point and gathers the names callers import (`from chatbot.app import create_app`).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # `python examples/chatbot/app.py`: import as the `chatbot` package
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from chatbot.cli import main

    raise SystemExit(main())

from .citations import attribution_payload, citation_payload, earlier_answer
from .cli import log_exposure, main, served_names
from .routes import create_app
from .service import (
    DEFAULT_MAX_HISTORY,
    DEFAULT_MAX_HISTORY_CHARS,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_QUESTION_CHARS,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_MAX_UPLOAD_FILES,
    DEFAULT_MAX_UPLOADED_DOCUMENTS,
    DEFAULT_TOP_K,
    DEFAULT_UPLOAD_DIR,
    SAMPLE_DOCS,
    SAMPLE_QUESTIONS,
    ChatService,
    load_attributor,
    load_default_attributor,
)
from .streaming import Cancelled, sse

__all__ = [
    "DEFAULT_MAX_HISTORY",
    "DEFAULT_MAX_HISTORY_CHARS",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_MAX_QUESTION_CHARS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_MAX_UPLOAD_FILES",
    "DEFAULT_MAX_UPLOADED_DOCUMENTS",
    "DEFAULT_TOP_K",
    "DEFAULT_UPLOAD_DIR",
    "SAMPLE_DOCS",
    "SAMPLE_QUESTIONS",
    "Cancelled",
    "ChatService",
    "attribution_payload",
    "citation_payload",
    "create_app",
    "earlier_answer",
    "load_attributor",
    "load_default_attributor",
    "log_exposure",
    "main",
    "served_names",
    "sse",
]
