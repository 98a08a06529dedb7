"""Conversations: earlier turns, the system prompt and the question are scored like the documents
(`context_scores`, `context_sources`), and every citation carries `grounded` and `context` - through ChatAT2,
AT2CallbackHandler and AT2Citations, on the real embedded model and real langchain-core objects."""

from __future__ import annotations

import uuid
from operator import itemgetter
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.language_models import FakeListChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import RunnablePassthrough

from at2_rag.attribution.result import context_key
from langchain_at2 import AT2CallbackHandler, AT2Citations, ChatAT2
from langchain_at2.annotations import context_refs
from langchain_at2.callbacks import EVENT_NAME

pytestmark = pytest.mark.slow

DOCS = [
    Document(
        id="vacation",
        page_content="Employees get 25 vacation days per year. Vacation days are approved by your manager.",
    ),
    Document(id="carry-over", page_content="Unused vacation days cannot be carried over to the next year."),
    Document(id="office-hours", page_content="The office is open from 8am to 6pm."),
]
FIRST_QUESTION = "How many vacation days do I get per year?"
EARLIER_ANSWER = "You get 25 vacation days per year, approved by your manager."
FOLLOW_UP = "Can unused vacation days be carried over?"
HISTORY = [HumanMessage(FIRST_QUESTION), AIMessage(EARLIER_ANSWER)]


def format_docs(docs: list[Document]) -> str:
    return "\n\n".join(d.page_content for d in docs)


def _check_citations(at2: dict, text: str) -> None:
    keys = set(at2["context_scores"])
    assert at2["citations"]
    for c in at2["citations"]:
        assert text[c["start"] : c["end"]] == c["text"]
        assert isinstance(c["grounded"], float)
        assert isinstance(c["context"], list)
        # the context sources of Attribution.to_dict(), keyed like context_scores
        assert all(context_key(src["kind"], src["index"]) in keys - {"query"} for src in c["context"])
        assert [s["score"] for s in c["context"]] == sorted((s["score"] for s in c["context"]), reverse=True)
        assert c["supported"] or not c["cited"]


def _check_sources(at2: dict, expected: list[tuple[str, str, str]]) -> None:
    """expected: (key, role, text) of every context source, in prompt order."""
    assert [(context_key(s["kind"], s["index"]), s["role"], s["text"]) for s in at2["context_sources"]] == expected
    assert at2["context_scores"] == {context_key(s["kind"], s["index"]): s["score"] for s in at2["context_sources"]}
    assert all(isinstance(v, float) for v in at2["context_scores"].values())


class EventCollector(BaseCallbackHandler):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        self.events.append((name, data))


@pytest.fixture(scope="module")
def llm(attributor) -> ChatAT2:
    return ChatAT2(max_tokens=12)


def test_chat_history_becomes_context_sources_in_template_mode(llm) -> None:
    msg = llm.invoke([*HISTORY, HumanMessage(FOLLOW_UP)], documents=DOCS)
    at2 = msg.response_metadata["at2"]
    assert at2["mode"] == "template"
    system = llm.get_attributor().template.system_prompt
    _check_sources(
        at2,
        [
            ("system", "system", system),
            ("history:0", "user", FIRST_QUESTION),
            ("history:1", "assistant", EARLIER_ANSWER),
            ("query", "user", FOLLOW_UP),
        ],
    )
    _check_citations(at2, msg.text)
    # the standard Citation annotations carry the sentence's grounded and context too
    by_sentence = {(c["start"], c["end"]): c for c in at2["citations"]}
    annotations = msg.content_blocks[0].get("annotations", [])
    assert annotations or not any(c["cited"] for c in at2["citations"])
    for ann in annotations:
        c = by_sentence[(ann["start_index"], ann["end_index"])]
        assert ann["extras"]["grounded"] == c["grounded"] and ann["extras"]["context"] == context_refs(c["context"])
    # streaming: the last chunk carries the same
    chunks = list(llm.stream([*HISTORY, HumanMessage(FOLLOW_UP)], documents=DOCS))
    assert chunks[-1].response_metadata["at2"]["context_scores"] == pytest.approx(at2["context_scores"])


def test_chat_history_becomes_context_sources_in_prompt_mode(llm) -> None:
    """Documents formatted into the system message: that message is a document holder, not a source."""
    system = SystemMessage("Answer from the context.\n\n" + format_docs(DOCS))
    msg = llm.invoke([system, *HISTORY, HumanMessage(FOLLOW_UP)], documents=DOCS)
    at2 = msg.response_metadata["at2"]
    assert at2["mode"] == "prompt" and at2["unlocated_documents"] == []
    _check_sources(
        at2,
        [
            ("history:0", "user", FIRST_QUESTION),
            ("history:1", "assistant", EARLIER_ANSWER),
            ("query", "user", FOLLOW_UP),
        ],
    )
    _check_citations(at2, msg.text)


def test_handler_attributes_a_repeated_answer_to_the_earlier_turn(attributor) -> None:
    """A chain whose model repeats its earlier answer: the handler scores that turn above every document."""
    from examples.langchain_rag import BM25SRetriever

    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "Answer from the context.\n\n{context}"),
            MessagesPlaceholder("chat_history"),
            ("human", "{question}"),
        ]
    )
    retriever = BM25SRetriever(documents=DOCS, k=3)
    chain = (
        RunnablePassthrough.assign(context=itemgetter("question") | retriever | format_docs)
        | prompt
        | FakeListChatModel(responses=[EARLIER_ANSWER])
        | StrOutputParser()
    )
    handler, collector = AT2CallbackHandler(attributor=attributor), EventCollector()
    run_id = uuid.uuid4()
    answer = chain.invoke(
        {"question": FOLLOW_UP, "chat_history": HISTORY}, config={"callbacks": [handler, collector], "run_id": run_id}
    )
    assert answer == EARLIER_ANSWER
    result = handler.results[run_id]
    assert result.error is None and result.query == FOLLOW_UP
    assert set(result.context_scores) == {"history:0", "history:1", "query"}
    assert result.context_scores["history:1"] > max(result.scores.values())
    meta = result.metadata
    assert meta["context_scores"] == result.context_scores
    _check_citations(meta, answer)
    (citation,) = meta["citations"]
    assert context_refs(citation["context"])[0]["key"] == "history:1"
    assert citation["grounded"] == result.attribution.citations[0].grounded
    # the custom event carries the same
    ((_, data),) = [e for e in collector.events if e[0] == EVENT_NAME]
    assert data["context_scores"] == result.context_scores and data["citations"][0]["context"] == citation["context"]


def test_citations_with_prompt_or_chat_history(attributor) -> None:
    """AT2Citations over an answer that repeats the earlier turn: from the chain's prompt (messages) or, with no
    prompt, from `chat_history` (at2-rag's own template)."""
    prompt = [
        SystemMessage("Answer from the context.\n\n" + format_docs(DOCS)),
        *HISTORY,
        HumanMessage(FOLLOW_UP),
    ]
    base = {"question": FOLLOW_UP, "context": DOCS, "answer": EARLIER_ANSWER}
    cite = AT2Citations(attributor=attributor)
    for inputs, keys in (
        ({**base, "prompt": prompt}, {"history:0", "history:1", "query"}),
        ({**base, "chat_history": HISTORY}, {"system", "history:0", "history:1", "query"}),
    ):
        out = cite.invoke(inputs)
        assert out["at2_error"] is None
        assert set(out["context_scores"]) == keys
        scores = {d.id: d.metadata["at2_score"] for d in out["context"]}
        assert out["context_scores"]["history:1"] > max(scores.values())
        (c,) = out["citations"]
        assert isinstance(c["grounded"], float) and c["grounded"] == out["attribution"].citations[0].grounded
        assert c["context"][0]["key"] == "history:1"
    without = cite.invoke(base)
    assert set(without["context_scores"]) == {"system", "query"}
    with pytest.raises(TypeError, match="chat history"):
        cite.invoke({**base, "chat_history": "not a list"})
