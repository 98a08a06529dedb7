"""Concurrent `aquery` calls on AT2CitationQueryEngine share one batched generation (the core's micro-batcher)
and answer exactly as queries run one at a time."""

from __future__ import annotations

import asyncio

import pytest
from conftest import PENICILLIN

from at2_rag import get_micro_batcher

QUESTIONS = [PENICILLIN, "Who made the first confirmed ascent of Mount Everest?", "What is photosynthesis?"]


@pytest.fixture(scope="module")
def engine(attributor, vector_index):
    from llama_index.postprocessor.at2 import AT2CitationQueryEngine

    return AT2CitationQueryEngine.from_args(vector_index, attributor=attributor, similarity_top_k=3, max_new_tokens=16)


def _key(response):
    at2 = response.metadata["at2"]
    return response.response, [round(d["score"], 4) for d in at2["documents"]]


def test_concurrent_aqueries_share_a_batch(engine, attributor) -> None:
    alone = [_key(engine.query(q)) for q in QUESTIONS]
    batcher = get_micro_batcher(attributor)
    before = len(batcher.stats.batch_sizes)

    async def all_at_once():
        return await asyncio.gather(*(engine.aquery(q) for q in QUESTIONS))

    together = [_key(r) for r in asyncio.run(all_at_once())]
    assert together == alone
    assert max(batcher.stats.batch_sizes[before:]) > 1, batcher.stats.batch_sizes[before:]
