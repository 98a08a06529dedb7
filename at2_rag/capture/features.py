"""From per-token captured attention to per-target head features: a target's feature is the mean of its
answer tokens' rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FEATURE_VERSION = 1
FEATURE_DEFINITION = (
    "f[target, source, layer*H + head] = mean over the target's tokens (query rows = the positions that "
    "predict them) of the sum over the source's tokens of the fp32 softmax attention weight; heads "
    "ordered layer-major, one feature per query head (AT2 reference definition)"
)


def target_features(token_features: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """Mean over the target's token rows: `[rows, sources, LH]` -> `[sources, LH]`."""
    if not rows:
        return token_features.new_zeros(token_features.shape[1:])
    return token_features[list(rows)].mean(dim=0)
