"""ChatAT2 with documents, on the real embedded model and a real BM25 retriever over tests/data/corpus.jsonl."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langchain_core.tracers.run_collector import RunCollectorCallbackHandler

from langchain_at2 import ChatAT2, attribution_from_metadata, rag_messages
from langchain_at2.annotations import trace_summary

pytestmark = pytest.mark.slow

QUESTION = "When was the Eiffel Tower completed?"


@pytest.fixture(scope="module")
def llm(attributor) -> ChatAT2:
    return ChatAT2(max_tokens=20)


@pytest.fixture(scope="module")
def retrieved(bm25_retriever):
    docs = bm25_retriever.invoke(QUESTION)
    assert docs[0].id == "eiffel-tower"
    return docs


def _check_at2(message: AIMessage, doc_ids: list[str]) -> dict:
    assert isinstance(message, AIMessage) and message.text.strip()
    at2 = message.response_metadata["at2"]
    assert set(at2["scores"]) == set(doc_ids)
    # Attribution.to_dict(): documents in prompt order, with the schema tag
    assert at2["schema"] == "at2-rag/attribution"
    assert [d["index"] for d in at2["documents"]] == list(range(len(at2["documents"])))
    assert at2["scores"] == {d["id"]: d["score"] for d in at2["documents"]}
    assert attribution_from_metadata(message).document_scores() == at2["scores"]
    assert at2["citations"], "every non-empty answer has at least one sentence"
    for c in at2["citations"]:
        assert message.text[c["start"] : c["end"]] == c["text"]
        assert set(c["cited"]) <= set(doc_ids)
    (block,) = message.content_blocks
    assert block["type"] == "text" and block["text"] == message.text
    for ann in block.get("annotations", []):
        assert ann["type"] == "citation" and ann["extras"]["document_id"] in doc_ids
        assert 0 <= ann["start_index"] < ann["end_index"] <= len(message.text)
    assert message.usage_metadata and message.usage_metadata["output_tokens"] > 0
    return at2


def test_documents_kwarg_uses_the_template(llm, retrieved) -> None:
    collector = RunCollectorCallbackHandler()
    msg = llm.invoke(QUESTION, documents=retrieved, config={"callbacks": [collector]})
    at2 = _check_at2(msg, [d.id for d in retrieved])
    # the trace (here langchain-core's run collector; LangSmith alike) has the summary in the run's metadata
    (run,) = collector.traced_runs
    assert (
        run.extra["metadata"]["at2"] == trace_summary(at2) and run.extra["metadata"]["at2"]["scores"] == at2["scores"]
    )
    assert at2["mode"] == "template"
    assert max(at2["scores"], key=at2["scores"].get) == "eiffel-tower"  # the document holding the answer ranks first
    assert {d["id"]: d["title"] for d in at2["documents"]}["eiffel-tower"] == "Eiffel Tower"
    annotations = msg.content_blocks[0].get("annotations", [])
    assert any(a["extras"]["document_id"] == "eiffel-tower" and a["url"].endswith("Eiffel_Tower") for a in annotations)


def test_documents_in_your_own_prompt_are_located(llm, bm25_retriever) -> None:
    """LCEL: retriever -> ChatPromptTemplate (docs formatted into the system message) -> ChatAT2 bound per call."""
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer from this context only.\n\n{context}"), ("human", "{question}")]
    )

    def answer(inputs: dict) -> AIMessage:
        context = "\n\n".join(d.page_content for d in inputs["docs"])
        messages = prompt.invoke({"context": context, "question": inputs["question"]})
        return llm.bind(documents=inputs["docs"]).invoke(messages)

    chain = {"docs": bm25_retriever, "question": RunnablePassthrough()} | RunnableLambda(answer)
    question = "Who discovered penicillin?"
    msg = chain.invoke(question)
    ids = [d.id for d in bm25_retriever.invoke(question)]
    at2 = _check_at2(msg, ids)
    assert at2["mode"] == "prompt" and at2["unlocated_documents"] == []


def test_unlocated_documents_are_reported(llm, corpus, caplog) -> None:
    docs = [d for d in corpus if d.id in ("jupiter", "octopus")]
    messages = [HumanMessage(f"Context: {docs[0].page_content}\n\nHow big is Jupiter?")]
    with caplog.at_level("WARNING"):
        msg = llm.invoke(messages, documents=docs)
    at2 = msg.response_metadata["at2"]
    assert at2["mode"] == "prompt" and set(at2["scores"]) == {"jupiter"}
    assert [u["id"] for u in at2["unlocated_documents"]] == ["octopus"]
    assert "not in the prompt" in caplog.text


def test_document_blocks_and_additional_kwargs(llm, corpus) -> None:
    docs = [d for d in corpus if d.id in ("honeybees", "coffee")]
    via_blocks = llm.invoke(rag_messages("How do bees share where flowers are?", docs))
    _check_at2(via_blocks, ["honeybees", "coffee"])
    via_kwargs = llm.invoke(
        [HumanMessage("How do bees share where flowers are?", additional_kwargs={"documents": docs})]
    )
    assert via_kwargs.response_metadata["at2"]["scores"].keys() == {"honeybees", "coffee"}
    assert via_blocks.text == via_kwargs.text  # same prompt, greedy decoding


def test_stream_sends_text_then_attribution(llm, retrieved) -> None:
    chunks = list(llm.stream(QUESTION, documents=retrieved))
    assert len(chunks) > 3
    assert all("at2" not in c.response_metadata for c in chunks[:-1])
    assert chunks[-1].chunk_position == "last" and "at2" in chunks[-1].response_metadata
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    _check_at2(full, [d.id for d in retrieved])
    assert full.text == llm.invoke(QUESTION, documents=retrieved).text


async def test_async_and_v1_output(retrieved) -> None:
    v1 = ChatAT2(max_tokens=20, output_version="v1")
    msg = await v1.ainvoke(QUESTION, documents=retrieved)
    assert isinstance(msg.content, list) and msg.content[0]["type"] == "text"
    assert msg.content[0]["text"] == msg.text
    full = None
    async for chunk in v1.astream(QUESTION, documents=retrieved):
        full = chunk if full is None else full + chunk
    text_blocks = [b for b in full.content if b["type"] == "text"]
    assert len(text_blocks) == 1 and text_blocks[0]["text"] == msg.text
    assert text_blocks[0].get("annotations") == msg.content[0].get("annotations")


def test_plain_chat_and_stop(llm) -> None:
    msg = llm.invoke("Say hello.")
    assert msg.text and "at2" not in msg.response_metadata
    stopped = llm.invoke("Say hello.", stop=[msg.text[3:6]])
    assert stopped.text == msg.text[: msg.text.index(msg.text[3:6])]
    assert stopped.response_metadata["finish_reason"] == "stop"
    streamed = "".join(c.text for c in llm.stream("Say hello.", stop=[msg.text[3:6]]))
    assert streamed == stopped.text
    sampled = llm.invoke("Say hello.", temperature=0.8, max_tokens=6)
    assert sampled.usage_metadata["output_tokens"] <= 6


def test_full_lcel_chain(llm, bm25_retriever) -> None:
    chain = (
        {"docs": bm25_retriever, "question": RunnablePassthrough()}
        | RunnableLambda(lambda x: rag_messages(x["question"], x["docs"]))
        | llm
    )
    msg = chain.invoke("How tall is Mount Everest?")
    at2 = msg.response_metadata["at2"]
    assert max(at2["scores"], key=at2["scores"].get) == "mount-everest"
    assert (chain | StrOutputParser()).invoke("How tall is Mount Everest?") == msg.text
