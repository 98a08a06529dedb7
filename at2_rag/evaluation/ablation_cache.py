"""Each held-out example's ablations, measured once and cached on disk (safetensors + a digest of the example
and the estimator-independent settings), so evaluating another estimator or metric reruns no model pass."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..attributor import Attributor
from ..capture.features import target_features
from ..capture.masked import (
    ablated_answer_logit_probs,
    random_masks,
)
from ..evidence.layout import source_layout
from ..examples import example_seed
from ..prompting.answer import answer_targets
from ..storage.files import atomic_path

logger = logging.getLogger(__name__)

LDS_MASKS = 32
SURROGATE_SIZES = (32, 64)


def _labels(
    attributor: Attributor, ids: list[int], answer_len: int, spans: Any, masks: torch.Tensor, batch: int
) -> torch.Tensor:
    with attributor.lock:
        return ablated_answer_logit_probs(attributor.model, ids, answer_len, spans, masks, batch)


@dataclass
class ExampleAblations:
    """Everything about one held-out example that does not depend on the estimator under test.

    The answer's target features and every ablation measured for it (LDS ground truth, leave-one-out,
    surrogate fits, top-k probes). Saved per example under `--cache`, so evaluating another estimator on the
    same examples re-runs nothing but the few top-k masks no earlier run measured.
    """

    id: str
    input_ids: torch.Tensor  # prompt + the greedy answer, as measured
    spans: torch.Tensor  # [sources, 2] token span of every document
    target_rows: list[list[int]]  # answer rows of each target sentence, then of the whole answer
    features: torch.Tensor  # [targets + 1, sources, layers * heads]
    full_lp: torch.Tensor  # [answer_len] nothing ablated
    lds_masks: torch.Tensor  # [LDS_MASKS, sources]
    lds_lp: torch.Tensor  # [LDS_MASKS, answer_len]
    loo_lp: torch.Tensor  # [sources, answer_len], row i = source i ablated
    surrogate_masks: torch.Tensor  # [max surrogate size, sources]
    surrogate_lp: torch.Tensor
    probe_masks: torch.Tensor  # further masks measured for top-k drops
    probe_lp: torch.Tensor
    seconds: dict[str, float]  # generation, leave_one_out, surrogate_pass
    key: dict[str, Any]  # what the numbers depend on: model, seed, max_new_tokens, mask counts

    @property
    def num_sources(self) -> int:
        return self.features.shape[1]

    def measured(self) -> dict[tuple[bool, ...], torch.Tensor]:
        """Every mask with a measured answer, keep-mask tuple -> per-token logit-probs."""
        n = self.num_sources
        table = {tuple([True] * n): self.full_lp}
        loo = ~torch.eye(n, dtype=torch.bool)
        for masks, lps in ((self.lds_masks, self.lds_lp), (loo, self.loo_lp),
                           (self.surrogate_masks, self.surrogate_lp), (self.probe_masks, self.probe_lp)):
            for mask, lp in zip(masks.tolist(), lps):
                table[tuple(mask)] = lp
        return table

    def save(self, path: Path) -> None:
        """Atomically: a killed run leaves the old file or none, never half of one."""
        tensors = {
            name: getattr(self, name).contiguous()
            for name in ("input_ids", "spans", "features", "full_lp", "lds_lp", "loo_lp", "surrogate_lp", "probe_lp")
        }
        for name in ("lds_masks", "surrogate_masks", "probe_masks"):
            tensors[name] = getattr(self, name).to(torch.uint8).contiguous()
        meta = {"format": CACHE_FORMAT, "id": self.id, "target_rows": json.dumps(self.target_rows),
                "seconds": json.dumps(self.seconds), "key": json.dumps(self.key, sort_keys=True)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> ExampleAblations:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CACHE_FORMAT:
                raise ValueError(f"{path} is not an at2-rag evaluation cache file ({meta.get('format')!r})")
            t = {name: f.get_tensor(name) for name in f.keys()}
        for name in ("lds_masks", "surrogate_masks", "probe_masks"):
            t[name] = t[name].bool()
        return cls(id=meta["id"], target_rows=json.loads(meta["target_rows"]), seconds=json.loads(meta["seconds"]),
                   key=json.loads(meta["key"]), **t)


CACHE_FORMAT = "at2-rag-eval-cache-v1"


def _cache_path(cache_dir: Path, example_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", example_id)[:60]
    digest = hashlib.sha256(example_id.encode()).hexdigest()[:10]
    return cache_dir / f"{safe}-{digest}.safetensors"


def measure_ablations(
    attributor: Attributor,
    example: Any,
    seed: int = 1,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    surrogate_size: int = max(SURROGATE_SIZES),
) -> ExampleAblations | None:
    """Generate the answer with capture and run every estimator-independent ablation of one example."""
    t0 = time.perf_counter()
    request = {"query": example.query, "documents": example.documents, "history": example.history}
    run = attributor.run(attributor.prepare(request, max_new_tokens=max_new_tokens))
    gen_seconds = time.perf_counter() - t0
    targets = answer_targets(run.answer)
    spans, columns, _ = source_layout(run, "documents")
    n = len(spans)
    if not targets or n == 0:
        return None
    ids = run.prompt.input_ids + run.answer.token_ids
    a_len = len(run.answer.token_ids)
    target_rows = [list(rows) for _, rows in targets]
    target_rows.append([r for rows in target_rows for r in rows])
    features = torch.stack([target_features(run.token_features[:, columns], rows) for rows in target_rows])
    gen = torch.Generator().manual_seed(example_seed(seed, example.id))

    lds_masks = random_masks(n, LDS_MASKS, 0.5, gen)  # fresh masks: the LDS ground truth
    everything = torch.ones(1, n, dtype=torch.bool)
    truth = _labels(attributor, ids, a_len, spans, torch.cat([everything, lds_masks]), batch_size)
    t = time.perf_counter()
    loo_lp = _labels(attributor, ids, a_len, spans, ~torch.eye(n, dtype=torch.bool), batch_size)
    loo_seconds = time.perf_counter() - t
    t = time.perf_counter()
    surrogate_masks = random_masks(n, surrogate_size, 0.5, gen)
    surrogate_lp = _labels(attributor, ids, a_len, spans, surrogate_masks, batch_size)
    pass_seconds = (time.perf_counter() - t) / surrogate_size
    return ExampleAblations(
        id=example.id, input_ids=torch.tensor(ids), spans=torch.tensor(spans, dtype=torch.long).reshape(n, 2),
        target_rows=target_rows, features=features.float(), full_lp=truth[0], lds_masks=lds_masks,
        lds_lp=truth[1:], loo_lp=loo_lp, surrogate_masks=surrogate_masks, surrogate_lp=surrogate_lp,
        probe_masks=torch.zeros(0, n, dtype=torch.bool), probe_lp=torch.zeros(0, a_len),
        seconds={"generation": gen_seconds, "leave_one_out": loo_seconds, "surrogate_pass": pass_seconds},
        key={},
    )
