"""Collect AT2 training data: features of the model's own answer plus labels of random ablations.

For each example: generate the answer (greedy, recorded) with attention capture, split it into target
sentences, and for each target keep the head features of every source and the log-odds of the target under
32 random ablation masks (one batched teacher-forced pass per batch of masks gives every target's label).
Runs resumably: finished shards are skipped by example id; `accelerate launch` splits examples over processes.
Every example is checked before any model work (its prompt rendered and fitted to the context window): a bad
one stops the run before it starts, naming each bad example, or with `skip_invalid` is skipped and reported.
Whatever happens mid-run, the examples finished so far are written to a shard before the error propagates.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..attributor import Attributor
from ..capture.features import target_features
from ..capture.masked import ablated_answer_logit_probs, random_masks, target_log_odds
from ..errors import (
    ContextTooLongError,
    InvalidExamplesError,
    InvalidInputError,
    NoDocumentsError,
    PromptRenderError,
)
from ..evidence.layout import SOURCE_KINDS, TARGET_KINDS, SourceKind, TargetKind, document_token_sources, source_layout
from ..examples import example_seed
from ..prompting.answer import answer_targets
from ..prompting.sources import CharSpan
from ..storage.files import atomic_path
from .data import (
    CollectedExample,
    Example,
    InvalidExample,
    ScannedExamples,
    completed_ids,
    remove_stale_temp_shards,
    scan_examples,
    write_shard,
)

logger = logging.getLogger(__name__)

NUM_MASKS = 32
KEEP_PROB = 0.5


def collect_example(
    attributor: Attributor,
    example: Example,
    num_masks: int = NUM_MASKS,
    keep_prob: float = KEEP_PROB,
    sources: SourceKind = "documents",
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = NUM_MASKS + 1,
    targets_of: TargetKind = "sentences",
    leave_one_out: bool = False,
) -> CollectedExample | None:
    """Features and ablation labels for one example, or None when the answer has no usable target.

    With `sources="context"` the last mask removes every document and keeps every context part, so each
    target also records the all-documents-removed label that groundedness is calibrated on. With
    `sources="tokens"` every document token is its own source (`document_token_sources`), as the reference AT2
    trains; an estimator trained on them is applied to documents and sentences unchanged (features add up).
    `targets_of="answer"` makes the whole answer the one target instead of each of its sentences.
    `leave_one_out` adds one mask per source that removes it alone (after the random ones): what top-1 agreement
    with leave-one-out is measured on, and what the random masks, which remove half the sources at once, do not
    show when two sources say the same thing (an earlier answer and the document it copied). Each mask's kind is
    recorded in `meta["mask_kinds"]` ("random", "leave_one_out", "no_documents")."""
    request = {"query": example.query, "documents": example.documents, "history": example.history}
    run = attributor.run(attributor.prepare(request, max_new_tokens=max_new_tokens))
    targets = answer_targets(run.answer)
    if targets_of == "answer" and targets:
        answer = run.answer
        rows = [i for i, (a, b) in enumerate(answer.char_spans) if b > a]
        targets = [(CharSpan(start=0, end=len(answer.text)), rows)]
    if sources == "tokens":  # features to every document token: one more pass over the run's own tokens
        spans, source_ids = document_token_sources(run.prompt)
        token_features = attributor.span_features(run, spans) if spans and targets else run.token_features
    else:
        spans, columns, source_ids = source_layout(run, sources)
        token_features = run.token_features[:, columns]
    if not targets or not spans:
        logger.info("example %s: no target sentence or no source, skipped", example.id)
        return None
    features = torch.stack([target_features(token_features, rows) for _, rows in targets])
    generator = torch.Generator().manual_seed(example_seed(seed, example.id))
    masks = random_masks(len(spans), num_masks, keep_prob, generator)
    kinds = ["random"] * num_masks
    if leave_one_out:
        masks = torch.cat([masks, ~torch.eye(len(spans), dtype=torch.bool)])
        kinds += ["leave_one_out"] * len(spans)
    if sources == "context":
        no_documents = torch.ones(1, len(spans), dtype=torch.bool)
        no_documents[0, : len(run.prompt.doc_sources)] = False
        masks = torch.cat([masks, no_documents])
        kinds.append("no_documents")
    ids = run.prompt.input_ids + run.answer.token_ids
    all_masks = torch.cat([torch.ones(1, len(spans), dtype=torch.bool), masks])  # row 0: nothing ablated
    with attributor.lock:
        logit_probs = ablated_answer_logit_probs(  # one-token sources leave no prefix worth sharing
            attributor.model, ids, len(run.answer.token_ids), spans, all_masks, batch_size,
            share_prefixes=sources != "tokens",
        )
    labels = torch.stack([target_log_odds(logit_probs, rows) for _, rows in targets])  # [targets, 1 + masks]
    meta = {
        "id": example.id,
        "query": example.query,
        "answer": run.answer.text,
        "finish_reason": run.finish_reason,
        "targets": [[span.start, span.end] for span, _ in targets],
        "source_ids": source_ids,
        "sources": sources,
        "targets_of": targets_of,
        "num_prompt_tokens": run.prompt.num_tokens,
        "num_answer_tokens": len(run.answer.token_ids),
        "num_documents": len(run.prompt.doc_sources),
        "no_documents_mask": masks.shape[0] - 1 if sources == "context" else None,
        "mask_kinds": kinds,
    }
    return CollectedExample(example.id, features, masks, labels[:, 1:], labels[:, 0], meta)


def process_split() -> tuple[int, int, Any]:
    """(rank, world size, device) from accelerate when launched with it, else a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("ACCELERATE_MIXED_PRECISION"):
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes need the gloo backend
        if int(os.environ.get("WORLD_SIZE", "1")) != state.num_processes:
            raise RuntimeError(
                f"launched {os.environ.get('WORLD_SIZE')} processes but accelerate sees {state.num_processes}: "
                "refusing to collect, every process would take every example"
            )
        return state.process_index, state.num_processes, state.device
    return 0, 1, None


# errors that an example's own content causes (not the model's or the machine's)
EXAMPLE_ERRORS = (InvalidInputError, NoDocumentsError, ContextTooLongError, PromptRenderError)
SKIP_HINT = "fix them, or pass --skip-invalid (skip_invalid=True) to collect the others and report these"


def check_examples(
    scanned: ScannedExamples, attributor: Attributor, examples: list[Example], max_new_tokens: int
) -> None:
    """Render each example's prompt (tokenization only, no model pass) and check that it fits the context window
    with `max_new_tokens`: what would otherwise fail hours into a run fails, or is skipped, before it starts."""
    if examples:
        logger.info("checking the prompts of %d examples", len(examples))
    bad = set()
    for example in examples:
        try:
            attributor.prepare(example.query, example.documents, example.history, max_new_tokens=max_new_tokens)
        except EXAMPLE_ERRORS as exc:
            scanned.invalid.append(InvalidExample(example.line, example.position or 0, example.id, str(exc)))
            bad.add(example.position)
    if bad:
        scanned.examples = [e for e in scanned.examples if e.position not in bad]
        scanned.invalid.sort(key=lambda p: p.position)


def prepare_output_dir(output_dir: str | os.PathLike[str], rank: int = 0, world_size: int = 1) -> Path:
    """The output folder, created if needed, without the temp shards a killed run left behind."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InvalidInputError(f"{output_dir} exists and is not a folder: collect writes a folder of shards")
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_shards(output_dir, rank, world_size)
    return output_dir


SETTINGS_FILE = "collect.json"


def recorded_settings(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The settings a folder's collection recorded (`collect.json`), or None for a folder from before they were."""
    path = Path(folder) / SETTINGS_FILE
    if not path.exists():
        return None
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInputError(f"{path} is not a collection settings file ({exc}): restore or delete it") from exc
    if not isinstance(recorded, dict):
        raise InvalidInputError(f"{path} is not a collection settings file (not a JSON object)")
    return recorded


def check_settings(output_dir: Path, settings: dict[str, Any], has_shards: bool) -> None:
    """A folder holds one collection: resuming it with other settings (another model, mask count, answer length,
    `leave_one_out`...) would skip the examples already there and mix two kinds of shards that `train` then fits
    together, so it is an error naming each difference. The settings are written on the folder's first run; a
    folder collected before they were recorded is resumed with a warning, and a folder without shards yet (a
    first run that stopped before any) takes the new settings."""
    if not has_shards:
        with atomic_path(output_dir / SETTINGS_FILE) as tmp:
            tmp.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        return
    recorded = recorded_settings(output_dir)
    if recorded is None:
        logger.warning("%s has shards but no %s (collected before settings were recorded): resuming it with %s",
                       output_dir, SETTINGS_FILE, settings)
        return
    differ = [f"{k}: {recorded.get(k)!r} there, {v!r} now" for k, v in settings.items()
              if k in recorded and recorded[k] != v]
    if differ:
        raise InvalidInputError(
            f"{output_dir} was collected with other settings ({'; '.join(differ)}): resuming would skip its "
            "examples and mix two kinds of shards. Collect into another folder (train and merge_collected take "
            "several)"
        )
    if settings.keys() - recorded.keys():  # a setting recorded only by newer versions (the model's shape) is added
        with atomic_path(output_dir / SETTINGS_FILE) as tmp:
            tmp.write_text(json.dumps({**recorded, **settings}, indent=2) + "\n", encoding="utf-8")


def collect(
    examples: str | os.PathLike[str] | Iterable[Any],
    output_dir: str | os.PathLike[str],
    attributor: Attributor,
    num_masks: int = NUM_MASKS,
    keep_prob: float = KEEP_PROB,
    sources: SourceKind = "documents",
    max_new_tokens: int = 64,
    seed: int = 0,
    shard_size: int = 16,
    targets_of: TargetKind = "sentences",
    batch_size: int = NUM_MASKS + 1,
    limit: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    skip_invalid: bool = False,
    leave_one_out: bool = False,
) -> dict[str, Any]:
    """Collect every example not already in `output_dir`; safe to kill and rerun at any point.

    Bad examples raise `InvalidExamplesError` (naming every one, by line and id) before any model work, or with
    `skip_invalid` are logged and listed under `"invalid"` in the returned summary. An example that fails mid-run
    is treated the same way (after the finished examples are written); any other error is raised after they are."""
    if sources not in SOURCE_KINDS or targets_of not in TARGET_KINDS:  # before any file or model work
        raise InvalidInputError(
            f"sources must be one of {', '.join(SOURCE_KINDS)} and targets_of one of {', '.join(TARGET_KINDS)}, "
            f"got {sources!r} and {targets_of!r}"
        )
    if num_masks < 0 or (num_masks == 0 and not leave_one_out):
        raise InvalidInputError(
            f"num_masks must be positive (or 0 with leave_one_out, for leave-one-out masks only), got {num_masks}"
        )
    if rank is None or world_size is None:
        rank, world_size, _ = process_split()
    scanned = scan_examples(examples, limit)
    output_dir = prepare_output_dir(output_dir, rank, world_size)
    done = completed_ids(output_dir)
    check_settings(output_dir, {
        "model": attributor.model_id, "num_masks": num_masks, "keep_prob": keep_prob, "sources": sources,
        "targets_of": targets_of, "max_new_tokens": max_new_tokens, "seed": seed, "leave_one_out": leave_one_out,
        # the feature grid, so `train` needs no --num-layers/--num-heads for any model
        "num_layers": attributor.num_layers, "num_heads": attributor.num_heads,
    }, has_shards=bool(done))
    mine = [ex for ex in scanned.examples if (ex.position or 0) % world_size == rank and ex.id not in done]
    check_examples(scanned, attributor, mine, max_new_tokens)
    if scanned.invalid and not skip_invalid:
        raise scanned.error(SKIP_HINT)
    # every rank reads every example, so each reports only the bad ones of its own share
    invalid = [p for p in scanned.invalid if p.position % world_size == rank]
    for problem in invalid:
        logger.warning("skipping invalid example in %s: %s", scanned.source, problem.describe())
    bad = {p.position for p in invalid}
    mine = [ex for ex in mine if ex.position not in bad]
    logger.info("rank %d/%d: %d examples to collect (%d already done, %d invalid skipped)", rank, world_size,
                len(mine), len(done), len(invalid))
    buffer: list[CollectedExample] = []
    skipped = written = 0
    start = time.time()

    def flush() -> None:
        nonlocal written
        if buffer:
            name = f"shard-r{rank:02d}-{int(time.time() * 1000):x}-{buffer[0].id.replace('/', '_')[:40]}.safetensors"
            write_shard(output_dir / name, buffer)
            written += len(buffer)
            buffer.clear()

    bar = tqdm(mine, desc=f"collect[{rank}]", unit="ex", disable=None)
    try:
        for example in bar:
            try:
                item = collect_example(
                    attributor, example, num_masks, keep_prob, sources, max_new_tokens, seed, batch_size, targets_of,
                    leave_one_out,
                )
            except EXAMPLE_ERRORS as exc:  # the example itself is at fault (validation could not foresee it)
                problem = InvalidExample(example.line, example.position or 0, example.id, str(exc))
                if not skip_invalid:
                    raise InvalidExamplesError(scanned.source, [problem], SKIP_HINT) from exc
                logger.warning("skipping invalid example in %s: %s", scanned.source, problem.describe())
                invalid.append(problem)
                continue
            if item is None:
                skipped += 1
                continue
            logger.info("collected %s", example.describe())
            buffer.append(item)
            if len(buffer) >= shard_size:
                flush()
            bar.set_postfix(written=written + len(buffer), skipped=skipped)
    except BaseException:  # an error, KeyboardInterrupt or SystemExit: keep what is finished, then propagate
        pending = len(buffer)
        try:
            flush()
        except Exception:  # never hide the original error behind this one
            logger.exception("could not write the %d finished examples of the interrupted run", pending)
        else:
            if pending:
                logger.warning("collect stopped early: wrote the %d finished examples to %s; rerun to resume",
                               pending, output_dir)
        raise
    finally:
        bar.close()
    flush()
    elapsed = time.time() - start
    return {
        "rank": rank,
        "collected": written,
        "skipped": skipped,
        "invalid": [p.to_dict() for p in invalid],
        "seconds": elapsed,
        "output_dir": str(output_dir),
    }
