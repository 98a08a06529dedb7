"""ChatAT2.batch / abatch share batched generations through the core's micro-batcher, with the same answers and
attributions as calls made one at a time."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.documents import Document

from at2_rag import get_micro_batcher
from langchain_at2 import ChatAT2, rag_messages

pytestmark = pytest.mark.slow

DOCS = [
    Document(page_content="The Eiffel Tower was completed in 1889 for the World's Fair.", id="eiffel"),
    Document(page_content="The Statue of Liberty was dedicated in 1886 in New York.", id="liberty"),
    Document(page_content="Big Ben's clock tower was completed in 1859 in London.", id="bigben"),
]
QUESTIONS = ["When was the Eiffel Tower completed?", "When was the Statue of Liberty dedicated?",
             "Where is Big Ben?"]


def _key(message):
    at2 = message.response_metadata["at2"]
    return message.text, [round(d["score"], 4) for d in at2["documents"]]


def test_batch_and_abatch_share_batches_and_match_single_calls(attributor) -> None:
    llm = ChatAT2(max_tokens=16)
    inputs = [rag_messages(q, DOCS) for q in QUESTIONS]
    alone = [_key(llm.invoke(m)) for m in inputs]
    batcher = get_micro_batcher(llm.get_attributor())
    before = len(batcher.stats.batch_sizes)
    batched = [_key(m) for m in llm.batch(inputs)]
    assert batched == alone
    assert max(batcher.stats.batch_sizes[before:]) > 1  # at least two calls ran in one batch

    before = len(batcher.stats.batch_sizes)
    async_batched = [_key(m) for m in asyncio.run(llm.abatch(inputs))]
    assert async_batched == alone
    assert max(batcher.stats.batch_sizes[before:]) > 1
