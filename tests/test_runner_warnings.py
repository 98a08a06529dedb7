"""`generate_batch` hands transformers its KV cache by the name this transformers version uses: no deprecation
warning on every batch (it printed "`past_key_values` is deprecated" before)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

_BATCH = """
from at2_rag import Attributor, load_default_model
model, tokenizer = load_default_model()
docs = ["The Eiffel Tower was completed in 1889.", "Paris is the capital of France."]
requests = [{"query": "When was the Eiffel Tower completed?", "documents": docs},
            {"query": "What is the capital of France, in one word?", "documents": docs}]
runs = Attributor(model, tokenizer).generate_batch(requests, max_new_tokens=6)
print("ANSWERS", len(runs))
"""


def test_generate_batch_prints_no_cache_deprecation() -> None:
    # a fresh process: transformers prints each deprecation once per process, so an earlier test could hide it
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _BATCH], env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "ANSWERS 2" in output
    assert "deprecated" not in output, output
