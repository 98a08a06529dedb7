"""Shared fixtures for the core tests."""

from __future__ import annotations

import os

import pytest
import torch

# On a machine shared with other jobs, torch's one thread per core oversubscribes the cores (real-model tests
# ran ~4x slower): set AT2_TEST_THREADS=1 there. CI has the machine to itself and keeps torch's default.
if os.environ.get("AT2_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["AT2_TEST_THREADS"]))


@pytest.fixture(scope="session")
def smollm():
    """The real embedded SmolLM2-135M-Instruct and its tokenizer (converted once, then cached on disk)."""
    from at2_rag import load_default_model

    model, tokenizer = load_default_model()
    return model, tokenizer


@pytest.fixture(scope="module")
def att(smollm):
    """An Attributor on the embedded model with its shipped estimator (one per test module)."""
    from at2_rag import Attributor

    model, tokenizer = smollm
    return Attributor(model, tokenizer)


def deepcopy_model(model):
    """`copy.deepcopy` of a model, also one already wrapped by an Attributor (its lock lives off the model)."""
    import copy

    return copy.deepcopy(model)


@pytest.fixture(scope="session")
def clone_model():
    """A function returning a deep copy of a model (see `deepcopy_model`)."""
    return deepcopy_model
