"""Prefix-shared ablations on sliding-window models (a cache of every position; the model's window mask over
absolute positions) give the full masked passes' numbers, on tiny models of every windowed family, with windows
much shorter than the sequence."""

from __future__ import annotations

import pytest
import torch
from test_capture_equivalence import CASES

from at2_rag.capture.masked import (
    ablated_answer_logit_probs,
    ablation_attention_mask,
    answer_logit_probs,
    full_attention_cache,
    prefix_sharing_cache,
    random_masks,
)

WINDOWED = [
    "qwen2-window-8-mixed", "mistral-window-8", "phi3-window-8", "gemma2-window-8-mixed", "gemma3-window-8-mixed",
]


@pytest.mark.parametrize("name", WINDOWED)
@pytest.mark.parametrize("batch_size", [3, 33])
def test_sliding_window_prefix_sharing_equals_full_passes(name, batch_size):
    cls, config = CASES[name]()
    torch.manual_seed(0)
    model = cls(config).eval()
    if full_attention_cache(model) is not None:
        pytest.skip(f"{name}: every cache layer is already full attention")
    assert prefix_sharing_cache(model) is not None  # the shared path really runs
    gen = torch.Generator().manual_seed(batch_size)
    ids = torch.randint(3, 96, (60,), generator=gen).tolist()
    spans = [(4, 12), (12, 20), (23, 31), (31, 31), (35, 44)]  # adjacent, gapped and empty sources
    masks = torch.cat([torch.ones(1, 5, dtype=torch.bool), random_masks(5, 32, 0.5, gen)])
    full = answer_logit_probs(model, ids, 9, ablation_attention_mask(len(ids), spans, masks))
    shared = ablated_answer_logit_probs(model, ids, 9, spans, masks, batch_size=batch_size)
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-5)
