"""`instrument_at2()`: the answer of any LlamaIndex engine, whatever its LLM, attributed from the exact prompt the LLM
received. Real llama-index-core engines (RetrieverQueryEngine, ContextChatEngine, CondensePlusContextChatEngine)
over a real VectorStoreIndex / BM25Retriever, a real CustomLLM that is not the AT2 model (`ExtractiveLLM`), and
the real embedded SmolLM2 scoring."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from conftest import PENICILLIN, ExtractiveLLM
from llama_index.core.base.response.schema import Response, StreamingResponse
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.llm import LLMChatStartEvent

EVEREST = "Who made the first confirmed ascent of Mount Everest?"


@pytest.fixture(scope="module")
def at2(attributor):
    from llama_index.postprocessor.at2 import instrument_at2

    handlers = instrument_at2(attributor)
    assert instrument_at2(attributor) is handlers  # registered once
    yield handlers
    handlers.uninstrument()


def check_attributed(response: Any, attributor: Any, prompt: Any, answer: str, query: str, node_text: dict) -> None:
    """`response` carries the AT2 attribution of (prompt, answer) over its source nodes, computed exactly as
    `attribute_rendered` computes it, ranked, annotated and serialised by the core."""
    from at2_rag import map_documents

    meta = response.metadata
    attribution, data = meta["attribution"], meta["at2"]
    assert data == attribution.to_dict() and data["schema"] == "at2-rag/attribution"
    assert attribution.answer == answer and attribution.query == query
    nodes = response.source_nodes
    direct = attributor.attribute_rendered(prompt, map_documents(nodes).documents, answer=answer, query=query)
    assert attribution.prompt == direct.prompt
    assert attribution.document_scores() == pytest.approx(direct.document_scores(), abs=1e-6)
    assert not attribution.unlocated_documents
    scores = [n.score for n in nodes]
    assert scores == sorted(scores, reverse=True)
    for rank, n in enumerate(nodes, 1):
        meta_n = n.node.metadata
        assert n.score == meta_n["at2_score"] == pytest.approx(attribution.document(n.node.node_id).score)
        assert meta_n["at2_rank"] == rank and meta_n["at2_document_id"] == n.node.node_id
        assert isinstance(meta_n["retrieval_score"], float)
        for s in meta_n["at2_sentences"]:
            assert node_text[n.node.node_id][s["start"] : s["end"]] == s["text"]
    assert meta["citations"] is data["citations"] and meta["at2_complete"] is True


def test_query_engine_over_vector_index_with_another_llm(at2, attributor, vector_index, node_text):
    llm = ExtractiveLLM()
    engine = vector_index.as_query_engine(llm=llm, similarity_top_k=4)
    response = engine.query(PENICILLIN)
    assert isinstance(response, Response)
    (prompt,) = llm.prompts  # the exact text the LLM received (the synthesizer's QA template, filled)
    answer = ExtractiveLLM.answer_for(prompt)
    assert response.response == answer and "Fleming" in answer
    check_attributed(response, attributor, prompt, answer, PENICILLIN, node_text)
    # the answer is a sentence copied from penicillin-0: AT2 puts that node first, far ahead of the others
    first, second = response.source_nodes[:2]
    assert first.node.node_id == "penicillin-0" and first.score > 5 * max(second.score, 1e-6)
    # the synthesizer's own node metadata (node id -> metadata) is kept next to ours
    assert response.metadata["penicillin-0"]["title"] == "Penicillin"
    assert at2.open_calls == 0  # nothing kept once the query has ended


def test_retriever_query_engine_over_bm25(at2, attributor, bm25, node_text):
    from llama_index.core.query_engine import RetrieverQueryEngine

    llm = ExtractiveLLM()
    response = RetrieverQueryEngine.from_args(bm25, llm=llm).query(EVEREST)
    answer = ExtractiveLLM.answer_for(llm.prompts[-1])
    assert response.response == answer and "Hillary" in answer
    check_attributed(response, attributor, llm.prompts[-1], answer, EVEREST, node_text)
    assert response.source_nodes[0].node.node_id == "mount_everest-0"


def test_context_chat_engine(at2, attributor, bm25, node_text, recorder):
    from llama_index.core.chat_engine import ContextChatEngine

    from llama_index.postprocessor.at2._common import chat_dicts

    chat = ContextChatEngine.from_defaults(retriever=bm25, llm=ExtractiveLLM(chat_model=True))
    out = chat.chat(PENICILLIN)
    (start,) = recorder.of(LLMChatStartEvent)  # the messages the chat engine sent its LLM
    messages = chat_dicts(start.messages)
    assert any(node_text["penicillin-0"] in m["content"] for m in messages)
    check_attributed(out, attributor, messages, out.response, PENICILLIN, node_text)
    assert out.source_nodes[0].node.node_id == "penicillin-0"
    assert out.sources[0].raw_output is out.source_nodes  # the ToolOutput shares the annotated list
    assert at2.open_calls == 0


def test_condense_plus_context_chat_engine_second_turn(at2, attributor, bm25, node_text):
    """Two LLM calls per turn (condense the question, then answer): the answer's call is attributed."""
    from llama_index.core.chat_engine import CondensePlusContextChatEngine
    from llama_index.core.llms import ChatMessage

    llm = ExtractiveLLM()  # a completion model: the chat engine's messages reach it as one prompt text
    chat = CondensePlusContextChatEngine.from_defaults(retriever=bm25, llm=llm)
    history = [
        ChatMessage(role="user", content="Tell me about mountains."),
        ChatMessage(role="assistant", content="Sure."),
    ]
    out = chat.chat(EVEREST, chat_history=history)
    assert len(llm.prompts) == 2  # condense, then answer
    prompt = llm.prompts[-1]
    assert EVEREST in prompt and node_text["mount_everest-0"] in prompt
    check_attributed(out, attributor, prompt, out.response, EVEREST, node_text)
    assert "mount_everest-0" in {n.node.node_id for n in out.source_nodes[:2]}


def test_streaming_query_engine_is_filled_when_the_stream_ends(at2, attributor, vector_index, node_text):
    llm = ExtractiveLLM()
    engine = vector_index.as_query_engine(llm=llm, similarity_top_k=4, streaming=True)
    streaming = engine.query(PENICILLIN)
    assert isinstance(streaming, StreamingResponse)
    assert not (streaming.metadata or {}).get("at2")
    assert at2.open_calls == 1  # waiting for the stream
    text = "".join(streaming.response_gen)
    assert text == ExtractiveLLM.answer_for(llm.prompts[-1])
    assert at2.open_calls == 0
    final = Response(text, streaming.source_nodes, streaming.metadata)
    check_attributed(final, attributor, llm.prompts[-1], text, PENICILLIN, node_text)


@pytest.mark.parametrize("engine_name", ["ContextChatEngine", "CondensePlusContextChatEngine"])
def test_streaming_chat_engines(at2, attributor, bm25, node_text, engine_name):
    """`stream_chat`: the chat engine consumes the LLM's stream in its own thread (started inside its span); the
    response is filled when the answer's LLM call ends, before `response_gen` finishes."""
    import llama_index.core.chat_engine as chat_engines

    llm = ExtractiveLLM(chat_model=True)
    chat = getattr(chat_engines, engine_name).from_defaults(retriever=bm25, llm=llm)
    out = chat.stream_chat(EVEREST)
    text = "".join(out.response_gen)
    assert text.strip() == ExtractiveLLM.answer_for(llm.prompts[-1]) and "Hillary" in text
    assert out.metadata and out.metadata["at2"]["answer"].strip() == text.strip()
    assert out.source_nodes[0].node.node_id == "mount_everest-0"
    scores = [n.score for n in out.source_nodes]
    assert scores == sorted(scores, reverse=True) and out.source_nodes[0].node.metadata["at2_rank"] == 1
    assert out.metadata["attribution"].query == EVEREST
    assert at2.open_calls == 0


@pytest.mark.asyncio
async def test_async_streaming_query_engine(at2, attributor, vector_index, node_text):
    from llama_index.core.base.response.schema import AsyncStreamingResponse

    llm = ExtractiveLLM()
    engine = vector_index.as_query_engine(llm=llm, similarity_top_k=4, streaming=True)
    streaming = await engine.aquery(PENICILLIN)
    assert isinstance(streaming, AsyncStreamingResponse)
    text = "".join([t async for t in streaming.async_response_gen()])
    assert text == ExtractiveLLM.answer_for(llm.prompts[-1])
    final = await streaming.get_response()
    check_attributed(final, attributor, llm.prompts[-1], text, PENICILLIN, node_text)
    assert at2.open_calls == 0


@pytest.mark.asyncio
async def test_aquery(at2, attributor, vector_index, node_text):
    llm = ExtractiveLLM()
    response = await vector_index.as_query_engine(llm=llm, similarity_top_k=4).aquery(PENICILLIN)
    check_attributed(response, attributor, llm.prompts[-1], response.response, PENICILLIN, node_text)
    assert at2.open_calls == 0


def test_concurrent_queries_get_their_own_attribution(at2, attributor, bm25):
    """One engine, two threads: state is keyed by span ids, so each response carries its own answer's scores."""
    from llama_index.core.query_engine import RetrieverQueryEngine

    engine = RetrieverQueryEngine.from_args(bm25, llm=ExtractiveLLM())
    questions = {PENICILLIN: "penicillin-0", EVEREST: "mount_everest-0"}
    results: dict = {}
    barrier = threading.Barrier(len(questions))

    def run(q: str) -> None:
        barrier.wait()
        results[q] = engine.query(q)

    threads = [threading.Thread(target=run, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for q, best in questions.items():
        r = results[q]
        assert r.metadata["at2"]["answer"] == r.response and r.metadata["at2"]["query"] == q
        assert {d["id"] for d in r.metadata["at2"]["documents"]} == {n.node.node_id for n in r.source_nodes}
        assert r.source_nodes[0].node.node_id == best
    assert at2.open_calls == 0


def test_at2_citation_query_engine_is_not_attributed_twice(at2, attributor, bm25, recorder):
    from llama_index.postprocessor.at2 import AT2AttributionEndEvent, AT2CitationQueryEngine

    engine = AT2CitationQueryEngine.from_args(bm25, attributor=attributor, max_new_tokens=8)
    response = engine.query(PENICILLIN)
    ends = recorder.of(AT2AttributionEndEvent)
    assert [e.source for e in ends] == ["query_engine"]
    assert ends[0].attribution == response.metadata["at2"]
    assert at2.open_calls == 0


def test_instrumentation_events(at2, vector_index, recorder):
    from llama_index.postprocessor.at2 import AT2AttributionEndEvent, AT2AttributionStartEvent

    response = vector_index.as_query_engine(llm=ExtractiveLLM(), similarity_top_k=2).query(PENICILLIN)
    (start,) = recorder.of(AT2AttributionStartEvent)
    (end,) = recorder.of(AT2AttributionEndEvent)
    assert start.source == end.source == "instrumentation" and start.query == end.query == PENICILLIN
    assert sorted(start.document_ids) == sorted(n.node.node_id for n in response.source_nodes)
    assert end.attribution == response.metadata["at2"] and end.error is None
    assert end.scores == response.metadata["attribution"].document_scores()
    assert start.span_id == end.span_id and start.span_id.startswith("RetrieverQueryEngine.query-")


def test_other_settings_need_uninstrument_first(at2, attributor):
    from llama_index.postprocessor.at2 import instrument_at2

    with pytest.raises(RuntimeError, match="uninstrument"):
        instrument_at2(attributor, ablations=2)


def test_nodes_missing_from_the_prompt_are_a_clear_error(at2, vector_index, recorder, caplog):
    """A synthesizer template that leaves the context out: no node occurs in the LLM's prompt, so nothing can be
    scored; the response says why (the dispatcher swallows handler errors, the handler does not)."""
    from llama_index.core import PromptTemplate

    from llama_index.postprocessor.at2 import AT2AttributionEndEvent

    llm = ExtractiveLLM()
    engine = vector_index.as_query_engine(
        llm=llm, similarity_top_k=2, text_qa_template=PromptTemplate("Question: {query_str}\nAnswer: ")
    )
    with caplog.at_level("WARNING", logger="llama_index.postprocessor.at2.instrumentation"):
        response = engine.query(PENICILLIN)
    assert response.metadata["at2"] is None
    assert response.metadata["at2_error"].startswith("DocumentsNotLocatedError")
    assert response.source_nodes and all("at2_score" not in n.node.metadata for n in response.source_nodes)
    assert "no attribution" in caplog.text
    (end,) = recorder.of(AT2AttributionEndEvent)
    assert end.attribution is None and end.error == response.metadata["at2_error"]
    assert at2.open_calls == 0


@pytest.mark.asyncio
async def test_achat(at2, attributor, bm25, node_text):
    from llama_index.core.chat_engine import ContextChatEngine

    llm = ExtractiveLLM()
    out = await ContextChatEngine.from_defaults(retriever=bm25, llm=llm).achat(EVEREST)
    check_attributed(out, attributor, llm.prompts[-1], out.response, EVEREST, node_text)
    assert out.source_nodes[0].node.node_id == "mount_everest-0"
    assert at2.open_calls == 0


def test_uninstrument(at2, vector_index):
    at2.uninstrument()
    at2.uninstrument()  # idempotent
    plain = vector_index.as_query_engine(llm=ExtractiveLLM(), similarity_top_k=2).query(PENICILLIN)
    assert "at2" not in (plain.metadata or {})
    assert at2.span_handler not in get_dispatcher().span_handlers
    assert at2.event_handler not in get_dispatcher().event_handlers
