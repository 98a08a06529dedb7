"""AT2CallbackHandler's run bookkeeping (langchain-core's tracer base): one attribution per model call, a root's
result never replaced by a later call without the documents, nothing kept for a run after it ends wherever the
handler is attached, the summary in the trace metadata; LangGraph retrieve -> answer -> grade. Real model, real
BM25 retrieval, real langchain-core (and langgraph) objects."""

from __future__ import annotations

import uuid
from operator import itemgetter

import pytest
from langchain_core.documents import Document
from langchain_core.language_models import FakeListChatModel
from langchain_core.messages import HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langchain_core.tracers.run_collector import RunCollectorCallbackHandler
from langchain_core.tracers.schemas import Run

from langchain_at2 import AT2CallbackHandler, ChatAT2
from langchain_at2.annotations import trace_summary

pytestmark = pytest.mark.slow

PROMPT = ChatPromptTemplate.from_messages(
    [("system", "You answer questions using the context.\n\nContext:\n{context}"), ("human", "{question}")]
)
QUESTION = "How many hearts does an octopus have?"


def format_docs(docs: list[Document]) -> str:
    return "\n\n".join(f"- {d.page_content}" for d in docs)


@pytest.fixture(scope="module")
def llm(attributor) -> ChatAT2:
    return ChatAT2(max_tokens=16)


def _model_runs(runs: list[Run]) -> list[Run]:
    out, stack = [], list(reversed(runs))
    while stack:
        run = stack.pop()
        if run.run_type in ("llm", "chat_model"):
            out.append(run)
        stack.extend(reversed(run.child_runs))
    return out


def test_a_later_call_without_the_documents_does_not_replace_the_answer(bm25_retriever, llm) -> None:
    answer = (
        {"context": itemgetter("question") | bm25_retriever | format_docs, "question": itemgetter("question")}
        | PROMPT
        | llm.with_config(run_name="answer")
        | StrOutputParser()
    )
    grade = (
        RunnableLambda(lambda a: [HumanMessage(f"Answer: {a}\nIs that a complete sentence? Reply yes or no.")])
        | ChatAT2(max_tokens=3).with_config(run_name="grader")
        | StrOutputParser()
    )
    chain = RunnablePassthrough.assign(answer=answer).assign(grade=itemgetter("answer") | grade)
    handler, collector = AT2CallbackHandler(), RunCollectorCallbackHandler()
    run_id = uuid.uuid4()
    out = chain.invoke({"question": QUESTION}, config={"callbacks": [handler, collector], "run_id": run_id})

    answered, graded = handler.calls[run_id]
    assert answered.run_name == "answer" and graded.run_name == "grader"
    assert answered.attribution is not None and answered.error is None and answered.answer == out["answer"]
    assert max(answered.scores, key=answered.scores.get) == "octopus"
    assert graded.attribution is None and "occurs in the prompt" in (graded.error or "")
    assert graded.answer == out["grade"]
    # the root keeps the answer from the documents; every call keeps its own result
    assert handler.results[run_id] is answered
    assert handler.llm_results[answered.llm_run_id] is answered and handler.llm_results[graded.llm_run_id] is graded
    assert handler.run_map == {} and handler.order_map == {}

    # the trace metadata of each model run, as a tracer after the handler recorded it
    by_id = {r.id: r for r in _model_runs(collector.traced_runs)}
    assert by_id[answered.llm_run_id].extra["metadata"]["at2"] == {
        **trace_summary(answered.to_event()),
        "error": None,
    }
    assert by_id[answered.llm_run_id].extra["metadata"]["at2"]["scores"] == answered.scores
    assert by_id[graded.llm_run_id].extra["metadata"]["at2"]["error"] == graded.error
    assert "at2" not in answered.run_metadata  # the copy kept with the result is the run's own metadata


def test_trace_metadata_can_be_switched_off(bm25_retriever, llm) -> None:
    chain = {"context": bm25_retriever | format_docs, "question": RunnablePassthrough()} | PROMPT | llm
    handler, collector = AT2CallbackHandler(trace_metadata=False), RunCollectorCallbackHandler()
    run_id = uuid.uuid4()
    chain.invoke(QUESTION, config={"callbacks": [handler, collector], "run_id": run_id})
    assert handler.results[run_id].attribution is not None
    (model_run,) = _model_runs(collector.traced_runs)
    assert "at2" not in model_run.extra["metadata"]


def test_attached_below_the_root_nothing_is_kept_after_a_run(bm25_retriever, llm) -> None:
    """The handler on an inner runnable only: its root is the outermost run it sees; run state ends with it."""
    handler = AT2CallbackHandler()
    inner = ({"context": bm25_retriever | format_docs, "question": RunnablePassthrough()} | PROMPT | llm).with_config(
        callbacks=[handler]
    )
    outer = RunnableLambda(lambda q: q.strip()) | inner | StrOutputParser()
    questions = ["Who discovered penicillin?", "How tall is Mount Everest?", "Where did coffee originate?", QUESTION]
    outer_ids = []
    for question in questions:
        outer_ids.append(uuid.uuid4())
        outer.invoke(question, config={"run_id": outer_ids[-1]})
        assert handler.run_map == {} and handler.order_map == {}
    assert len(handler.results) == len(questions) and not set(outer_ids) & set(handler.results)
    assert [r.query for r in handler.results.values()] == questions
    assert all(r.attribution is not None for r in handler.results.values())
    assert sum(len(c) for c in handler.calls.values()) == len(questions)


def test_max_results_bounds_what_is_kept(corpus, attributor) -> None:
    from examples.langchain_rag import BM25SRetriever

    retriever = BM25SRetriever(documents=corpus, k=2)
    chain = (
        {"context": retriever | format_docs, "question": RunnablePassthrough()}
        | PROMPT
        | FakeListChatModel(responses=["Three hearts."])
    )
    handler = AT2CallbackHandler(attributor=attributor, max_results=2)
    for _ in range(3):
        chain.invoke(QUESTION, config={"callbacks": [handler]})
    assert len(handler.results) == len(handler.calls) == len(handler.llm_results) == 2
    assert handler.run_map == {} and handler.order_map == {}


def test_langgraph_each_answer_node_keeps_its_attribution(bm25_retriever, llm) -> None:
    """examples/langgraph_rag.py: retrieve -> answer -> grade; graded "no" once, so the graph answers twice."""
    pytest.importorskip("langgraph")
    from examples.langgraph_rag import build_graph

    graph = build_graph(bm25_retriever, llm, grader=FakeListChatModel(responses=["no", "yes"]), max_attempts=3)
    handler = AT2CallbackHandler()
    run_id = uuid.uuid4()
    question = "Who discovered penicillin?"
    state = graph.invoke({"question": question}, config={"callbacks": [handler], "run_id": run_id})
    assert state["grades"] == ["no", "yes"] and len(state["answers"]) == 2

    calls = handler.calls[run_id]
    assert [c.run_metadata["langgraph_node"] for c in calls] == ["answer", "grade", "answer", "grade"]
    answers = [c for c in calls if c.run_metadata["langgraph_node"] == "answer"]
    assert [c.answer.strip() for c in answers] == state["answers"]
    for call in answers:  # each answer node's own attribution, over its own prompt
        assert call.attribution is not None and call.query == question
        assert max(call.scores, key=call.scores.get) == "penicillin"
    assert "An earlier answer was judged" in answers[1].attribution.prompt
    assert "An earlier answer was judged" not in answers[0].attribution.prompt
    assert all(c.attribution is None for c in calls if c.run_metadata["langgraph_node"] == "grade")
    # the root's result: the last answer from the documents, not the grader call after it
    assert handler.results[run_id] is answers[1]
    assert handler.run_map == {} and handler.order_map == {}
