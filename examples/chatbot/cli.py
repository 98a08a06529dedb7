"""The command line: `python -m examples.chatbot` (or `python examples/chatbot/app.py`) parses the flags, loads
the model, builds the app (`routes.create_app`) and serves it with uvicorn; at start it says who can reach it."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from pathlib import Path

from at2_rag.evidence.groundedness import GROUNDEDNESS_MODES

from .routes import create_app
from .security import LOOPBACK_NAMES, AuthFileError, read_tokens
from .service import (
    DEFAULT_MAX_HISTORY,
    DEFAULT_MAX_HISTORY_CHARS,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_QUESTION_CHARS,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_TOP_K,
    DEFAULT_UPLOAD_DIR,
    SAMPLE_DOCS,
    load_attributor,
    load_default_attributor,
)
from .uploads import PDF_TIMEOUT_S

logger = logging.getLogger("at2_rag.chatbot")


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
