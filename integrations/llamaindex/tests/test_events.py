"""AT2CitationQueryEngine / AT2NodePostprocessor speak LlamaIndex's instrumentation and callbacks: the standard
query, retrieval, synthesize and LLM events (with the exact prompt the model reads), AT2's own attribution
events, and the engine's `callback_manager`. Real BM25 retrieval, real model."""

from __future__ import annotations

from conftest import PENICILLIN

MAX_NEW = 8


def test_query_engine_emits_the_standard_events(attributor, bm25, recorder):
    from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
    from llama_index.core.callbacks.schema import EventPayload

    from llama_index.postprocessor.at2 import AT2CitationQueryEngine

    debug = LlamaDebugHandler()
    engine = AT2CitationQueryEngine.from_args(
        bm25, attributor=attributor, max_new_tokens=MAX_NEW, callback_manager=CallbackManager([debug])
    )
    response = engine.query(PENICILLIN)
    names = [type(e).__name__ for e in recorder.events]
    expected = [
        "QueryStartEvent",
        "RetrievalStartEvent",
        "RetrievalEndEvent",
        "SynthesizeStartEvent",
        "LLMCompletionStartEvent",
        "AT2AttributionStartEvent",
        "LLMCompletionEndEvent",
        "AT2AttributionEndEvent",
        "SynthesizeEndEvent",
        "QueryEndEvent",
    ]
    assert [n for n in names if n in expected] == expected
    by_name = {type(e).__name__: e for e in recorder.events}
    attribution = response.metadata["attribution"]
    # the LLM events carry the exact prompt the model read and its answer
    assert by_name["LLMCompletionStartEvent"].prompt == attribution.prompt
    assert by_name["LLMCompletionEndEvent"].response.text == response.response
    assert by_name["AT2AttributionEndEvent"].attribution == response.metadata["at2"]
    assert by_name["AT2AttributionStartEvent"].document_ids == [d["id"] for d in response.metadata["at2"]["documents"]]
    assert by_name["QueryEndEvent"].response is response
    # the events run in the engine's spans (query, and custom_query inside it), the retrieval in the retriever's
    assert by_name["QueryStartEvent"].span_id == by_name["QueryEndEvent"].span_id
    assert by_name["QueryStartEvent"].span_id.startswith("AT2CitationQueryEngine.query-")
    assert by_name["RetrievalEndEvent"].span_id.startswith("BM25Retriever.retrieve-")
    for name in ("SynthesizeStartEvent", "LLMCompletionStartEvent", "AT2AttributionEndEvent", "SynthesizeEndEvent"):
        assert by_name[name].span_id.startswith("AT2CitationQueryEngine.custom_query-")
    # the callback manager saw the query, the synthesis and the LLM call
    assert len(debug.get_event_pairs(CBEventType.QUERY)) == 1
    assert len(debug.get_event_pairs(CBEventType.SYNTHESIZE)) == 1
    ((start, end),) = debug.get_llm_inputs_outputs()
    assert start.payload[EventPayload.PROMPT] == attribution.prompt
    assert end.payload[EventPayload.COMPLETION].text == response.response


def test_streaming_ends_its_events_with_the_stream(attributor, bm25, recorder):
    from llama_index.postprocessor.at2 import AT2AttributionEndEvent, AT2CitationQueryEngine

    engine = AT2CitationQueryEngine.from_args(bm25, attributor=attributor, max_new_tokens=MAX_NEW, streaming=True)
    streaming = engine.query(PENICILLIN)
    assert not [e for e in recorder.events if isinstance(e, AT2AttributionEndEvent)]
    text = "".join(streaming.response_gen)
    (end,) = [e for e in recorder.events if isinstance(e, AT2AttributionEndEvent)]
    assert end.attribution == streaming.metadata["at2"] and end.attribution["answer"] == text


def test_postprocessor_emits_attribution_events(attributor, bm25, recorder):
    from llama_index.postprocessor.at2 import AT2AttributionEndEvent, AT2AttributionStartEvent, AT2NodePostprocessor

    pp = AT2NodePostprocessor(attributor, max_new_tokens=MAX_NEW)
    nodes = bm25.retrieve(PENICILLIN)
    out = pp.postprocess_nodes(nodes, query_str=PENICILLIN)
    (start,) = [e for e in recorder.events if isinstance(e, AT2AttributionStartEvent)]
    (end,) = [e for e in recorder.events if isinstance(e, AT2AttributionEndEvent)]
    assert start.source == end.source == "postprocessor"
    assert start.document_ids == [n.node.node_id for n in nodes]
    assert end.scores == {n.node.node_id: n.score for n in out}
