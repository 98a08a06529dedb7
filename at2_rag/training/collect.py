"""Collect AT2 training data: features of the model's own answer plus labels of random ablations.

For each example: generate the answer (greedy, recorded) with attention capture, split it into target
sentences, and for each target keep the head features of every source and the log-odds of the target under
32 random ablation masks (one batched teacher-forced pass per batch of masks gives every target's label).
Runs resumably: finished shards are skipped by example id; `accelerate launch` splits examples over processes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Literal

import torch
from tqdm.auto import tqdm

from ..attributor import Attributor
from ..features import answer_targets, target_features
from .ablation import ablated_answer_logit_probs, random_masks, target_log_odds
from .data import CollectedExample, Example, completed_ids, read_examples, write_shard

logger = logging.getLogger(__name__)

NUM_MASKS = 32
KEEP_PROB = 0.5


def example_seed(seed: int, example_id: str) -> int:
    """A per-example seed that does not depend on order or process count."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{example_id}".encode()).digest()[:8], "little") & (2**63 - 1)


def source_layout(run: Any, sources: str) -> tuple[list[tuple[int, int]], slice, list[str]]:
    """Token spans, feature columns and ids of the sources to ablate (documents or sentences)."""
    prompt = run.prompt
    n_docs = len(prompt.doc_sources)
    if sources == "documents":
        return prompt.doc_token_spans, slice(0, n_docs), [d.id for d in prompt.documents]
    ids = [f"{prompt.documents[s.doc_index].id}#{s.span.start}-{s.span.end}" for s in prompt.sentence_sources]
    return prompt.sentence_token_spans, slice(n_docs, None), ids


def collect_example(
    attributor: Attributor,
    example: Example,
    num_masks: int = NUM_MASKS,
    keep_prob: float = KEEP_PROB,
    sources: Literal["documents", "sentences"] = "documents",
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = NUM_MASKS + 1,
) -> CollectedExample | None:
    """Features and ablation labels for one example, or None when the answer has no usable target."""
    run = attributor.generate_run(example.query, example.documents, example.history, max_new_tokens=max_new_tokens)
    targets = answer_targets(run.answer)
    spans, columns, source_ids = source_layout(run, sources)
    if not targets or not spans:
        logger.info("example %s: no target sentence or no source, skipped", example.id)
        return None
    features = torch.stack([target_features(run.token_features[:, columns], rows) for _, rows in targets])
    generator = torch.Generator().manual_seed(example_seed(seed, example.id))
    masks = random_masks(len(spans), num_masks, keep_prob, generator)
    ids = run.prompt.input_ids + run.answer.token_ids
    all_masks = torch.cat([torch.ones(1, len(spans), dtype=torch.bool), masks])  # row 0: nothing ablated
    with attributor.lock:
        logit_probs = ablated_answer_logit_probs(attributor.model, ids, len(run.answer.token_ids), spans, all_masks, batch_size)
    labels = torch.stack([target_log_odds(logit_probs, rows) for _, rows in targets])  # [targets, 1 + masks]
    meta = {
        "id": example.id,
        "query": example.query,
        "answer": run.answer.text,
        "finish_reason": run.finish_reason,
        "targets": [[span.start, span.end] for span, _ in targets],
        "source_ids": source_ids,
        "sources": sources,
        "num_prompt_tokens": run.prompt.num_tokens,
        "num_answer_tokens": len(run.answer.token_ids),
    }
    return CollectedExample(example.id, features, masks, labels[:, 1:], labels[:, 0], meta)


def _process_split() -> tuple[int, int, Any]:
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


def collect(
    examples: str | os.PathLike[str] | Iterable[Any],
    output_dir: str | os.PathLike[str],
    attributor: Attributor,
    num_masks: int = NUM_MASKS,
    keep_prob: float = KEEP_PROB,
    sources: Literal["documents", "sentences"] = "documents",
    max_new_tokens: int = 64,
    seed: int = 0,
    shard_size: int = 16,
    batch_size: int = NUM_MASKS + 1,
    limit: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> dict[str, Any]:
    """Collect every example not already in `output_dir`; safe to kill and rerun at any point."""
    if rank is None or world_size is None:
        rank, world_size, _ = _process_split()
    todo = read_examples(examples)
    if limit is not None:
        todo = todo[:limit]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    done = completed_ids(output_dir)
    mine = [ex for i, ex in enumerate(todo) if i % world_size == rank and ex.id not in done]
    logger.info("rank %d/%d: %d examples to collect (%d already done)", rank, world_size, len(mine), len(done))
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
    for example in bar:
        item = collect_example(attributor, example, num_masks, keep_prob, sources, max_new_tokens, seed, batch_size)
        if item is None:
            skipped += 1
            continue
        buffer.append(item)
        if len(buffer) >= shard_size:
            flush()
        bar.set_postfix(written=written + len(buffer), skipped=skipped)
    flush()
    elapsed = time.time() - start
    return {"rank": rank, "collected": written, "skipped": skipped, "seconds": elapsed, "output_dir": str(output_dir)}
