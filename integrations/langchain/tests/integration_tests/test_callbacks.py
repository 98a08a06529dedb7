"""AT2CallbackHandler on existing LCEL RAG chains: real BM25 retrieval, real model, documents formatted by the chain."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import Generation, LLMResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

from langchain_at2 import AsyncAT2CallbackHandler, AT2CallbackHandler, ChatAT2
from langchain_at2.callbacks import EVENT_NAME

pytestmark = pytest.mark.slow

PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "You answer questions using the context.\n\nContext:\n{context}"),
        ("human", "{question}"),
    ]
)


def format_docs(docs: list[Document]) -> str:
    return "\n\n".join(f"- {d.page_content}" for d in docs)


@pytest.fixture(scope="module")
def llm(attributor) -> ChatAT2:
    """Used as a plain chat model (no documents): the handler does not rely on ChatAT2's own attribution."""
    return ChatAT2(max_tokens=16)


@pytest.fixture(scope="module")
def chain(bm25_retriever, llm):
    return (
        {"context": bm25_retriever | format_docs, "question": RunnablePassthrough()}
        | PROMPT
        | llm
        | StrOutputParser()
    )


class EventCollector(BaseCallbackHandler):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any, uuid.UUID]] = []
        self.threads: set[int] = set()

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.threads.add(threading.get_ident())

    def on_custom_event(self, name: str, data: Any, *, run_id: uuid.UUID, **kwargs: Any) -> None:
        self.events.append((name, data, run_id))


def test_results_per_root_run(chain, bm25_retriever) -> None:
    handler, collector = AT2CallbackHandler(), EventCollector()
    run_id = uuid.uuid4()
    question = "How many hearts does an octopus have?"
    answer = chain.invoke(question, config={"callbacks": [handler, collector], "run_id": run_id})
    result = handler.results[run_id]
    assert result.error is None and result.unlocated == []
    assert result.query == question and result.answer == answer
    retrieved = [d.id for d in bm25_retriever.invoke(question)]
    assert [d.id for d in result.documents] == retrieved
    assert set(result.scores) == set(retrieved)
    assert max(result.scores, key=result.scores.get) == "octopus"
    assert all(d.metadata["at2_score"] == result.scores[d.id] for d in result.documents)
    assert result.attribution is not None and result.attribution.answer == answer
    # the handler read the chain's own prompt: the formatted context, not at2-rag's template
    assert "You answer questions using the context." in result.attribution.prompt
    # the custom event went out under the chain's run
    (name, data, _), = [e for e in collector.events if e[0] == EVENT_NAME]
    assert data["run_id"] == str(run_id) and data["scores"] == result.scores
    # the tracer base's run tree of a finished root is forgotten, the result is kept
    assert handler.run_map == {} and handler.order_map == {}
    assert handler.calls[run_id] == [result] and handler.llm_results[result.llm_run_id] is result
    assert result.run_name == "ChatAT2" and result.run_metadata["ls_provider"] == "at2"


def test_documents_missing_from_the_prompt_are_reported(bm25_retriever, llm, caplog) -> None:
    def first_doc_only(docs: list[Document]) -> str:  # a chain that drops documents while formatting
        return docs[0].page_content

    chain = (
        {"context": bm25_retriever | first_doc_only, "question": RunnablePassthrough()}
        | PROMPT
        | llm
        | StrOutputParser()
    )
    handler = AT2CallbackHandler()
    run_id = uuid.uuid4()
    question = "Who discovered penicillin?"
    with caplog.at_level("WARNING"):
        chain.invoke(question, config={"callbacks": [handler], "run_id": run_id})
    result = handler.results[run_id]
    retrieved = bm25_retriever.invoke(question)
    assert len(retrieved) >= 2
    assert list(result.scores) == [retrieved[0].id]
    assert {u["id"] for u in result.unlocated} == {d.id for d in retrieved[1:]}
    assert all("does not occur" in u["reason"] for u in result.unlocated)
    assert {d.id: d.metadata["at2_score"] for d in result.documents if d.metadata["at2_score"] is None}.keys() == {
        d.id for d in retrieved[1:]
    }
    assert "were not found in the prompt" in caplog.text


QUESTIONS = [
    "How many hearts does an octopus have?",
    "Who discovered penicillin?",
    "How tall is Mount Everest?",
    "Who created the Python programming language?",
    "Where did coffee originate?",
    "How long is a marathon?",
    "What is the Great Red Spot on Jupiter?",
    "When was the Eiffel Tower completed?",
]


def test_eight_concurrent_invocations_do_not_mix(chain, bm25_retriever) -> None:
    handler, collector = AT2CallbackHandler(), EventCollector()
    answers = chain.batch(QUESTIONS, config={"callbacks": [handler, collector], "max_concurrency": 8})
    assert len(collector.threads) > 1, "the invocations really ran concurrently"
    assert len(handler.results) == len(QUESTIONS)
    by_query = {r.query: r for r in handler.results.values()}
    assert set(by_query) == set(QUESTIONS)
    for question, answer in zip(QUESTIONS, answers):
        result = by_query[question]
        assert result.error is None, result.error
        assert result.answer == answer
        assert [d.id for d in result.documents] == [d.id for d in bm25_retriever.invoke(question)]
        assert result.attribution is not None
        assert question in result.attribution.prompt and result.attribution.answer == answer
        assert set(result.scores) == {d.id for d in result.documents}
    assert len({r.run_id for r in handler.results.values()}) == len(QUESTIONS)
    assert handler.run_map == {} and handler.order_map == {}


@pytest.mark.parametrize("handler_class", [AsyncAT2CallbackHandler, AT2CallbackHandler])
async def test_event_in_astream_events(chain, handler_class) -> None:
    handler = handler_class()
    question = "Where did coffee originate?"
    events = []
    async for event in chain.astream_events(question, version="v2", config={"callbacks": [handler]}):
        events.append(event)
    custom = [e for e in events if e["event"] == "on_custom_event" and e["name"] == EVENT_NAME]
    assert len(custom) == 1
    data = custom[0]["data"]
    root_id = events[0]["run_id"]
    assert data["run_id"] == root_id and data["query"] == question
    assert data["scores"] == handler.results[uuid.UUID(root_id)].scores
    assert data["documents"][0]["id"] == "coffee"
    streamed = "".join(e["data"]["chunk"] for e in events if e["event"] == "on_chain_stream" and e["run_id"] == root_id)
    assert data["answer"] == streamed
    assert handler.run_map == {} and handler.order_map == {}


def test_text_prompts_from_completion_llms(attributor, corpus) -> None:
    """`on_llm_start` prompts (plain strings of completion LLMs) are attributed as raw text."""
    handler = AT2CallbackHandler()
    root, retriever_run, llm_run = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    docs = [d for d in corpus if d.id in ("amazon-river", "jupiter")]
    handler.on_chain_start({}, {"question": "Which river carries the most water?"}, run_id=root)
    handler.on_retriever_start({}, "Which river carries the most water?", run_id=retriever_run, parent_run_id=root)
    handler.on_retriever_end(docs, run_id=retriever_run, parent_run_id=root)
    prompt = f"{docs[0].page_content}\n{docs[1].page_content}\nQ: Which river carries the most water?\nA:"
    handler.on_llm_start({}, [prompt], run_id=llm_run, parent_run_id=root)
    handler.on_llm_end(
        LLMResult(generations=[[Generation(text=" The Amazon River.")]]), run_id=llm_run, parent_run_id=root
    )
    handler.on_chain_end({}, run_id=root)
    assert handler.run_map == {} and handler.order_map == {}
    result = handler.results[root]
    assert result.llm_run_id == llm_run and result.query == "Which river carries the most water?"
    assert result.attribution is not None and result.attribution.prompt == prompt
    assert max(result.scores, key=result.scores.get) == "amazon-river"


def test_model_calls_without_documents_are_ignored(llm) -> None:
    handler = AT2CallbackHandler()
    chain = RunnableLambda(lambda q: q) | llm | StrOutputParser()
    chain.invoke("Say hi.", config={"callbacks": [handler]})
    assert handler.results == {} and handler.calls == {} and handler.llm_results == {}
    assert handler.run_map == {} and handler.order_map == {}
