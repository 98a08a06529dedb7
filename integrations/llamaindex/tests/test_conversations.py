"""The system prompt and the question are scored like the nodes (`metadata["at2"]["context_scores"]`,
`context_sources`), and every citation carries `grounded` and `context`: real BM25 retrieval, real model,
real llama-index-core engines."""

from __future__ import annotations

import pytest
from conftest import PENICILLIN

MAX_NEW = 12


@pytest.fixture(scope="module")
def engine(attributor, bm25):
    from llama_index.postprocessor.at2 import AT2CitationQueryEngine

    return AT2CitationQueryEngine.from_args(bm25, attributor=attributor, max_new_tokens=MAX_NEW)


def check_context(metadata, question=None):
    at2, attribution = metadata["at2"], metadata["attribution"]
    assert at2 == attribution.to_dict()  # the core's serialisation, as is
    assert [(s["kind"], s["role"]) for s in at2["context_sources"]] == [("system", "system"), ("query", "user")]
    system = at2["context_sources"][0]["text"]
    assert system and system == attribution.context_sources[0].text
    if question is not None:
        assert at2["context_sources"][1]["text"] == question
    assert all(isinstance(s["score"], float) for s in at2["context_sources"])
    citations = metadata["citations"]
    assert citations and len(citations) == len(attribution.citations)
    for c, core in zip(citations, attribution.citations):
        assert isinstance(c["grounded"], float) and c["grounded"] == core.grounded
        assert c["supported"] == core.supported
        assert [s["kind"] for s in c["context"]] == [s.kind for s in core.context]
        assert all(s["kind"] != "query" for s in c["context"])


def test_query_engine_metadata_has_context_and_grounded(engine) -> None:
    response = engine.query(PENICILLIN)
    check_context(response.metadata, PENICILLIN)


def test_streaming_fills_context_after_the_stream(attributor, bm25) -> None:
    from llama_index.postprocessor.at2 import AT2CitationQueryEngine

    engine = AT2CitationQueryEngine.from_args(bm25, attributor=attributor, max_new_tokens=MAX_NEW, streaming=True)
    streaming = engine.query(PENICILLIN)
    assert streaming.metadata["at2"] is None
    "".join(streaming.response_gen)
    check_context(streaming.metadata, PENICILLIN)


def test_condense_question_chat_engine_passes_the_metadata_through(attributor, engine, local_settings) -> None:
    """LlamaIndex's chat engine rewrites the conversation into a standalone question for the query engine: the
    query engine's `Response` (with `metadata["at2"]`) is the chat response's source `raw_output`."""
    from llama_index.core.chat_engine import CondenseQuestionChatEngine
    from llama_index.core.llms import ChatMessage

    from llama_index.postprocessor.at2 import AT2LLM

    chat = CondenseQuestionChatEngine.from_defaults(query_engine=engine, llm=AT2LLM(attributor, max_new_tokens=16))
    history = [
        ChatMessage(role="user", content=PENICILLIN),
        ChatMessage(role="assistant", content="Alexander Fleming."),
    ]
    out = chat.chat("When did he discover it?", chat_history=history)
    (source,) = out.sources
    metadata = source.raw_output.metadata
    check_context(metadata)
