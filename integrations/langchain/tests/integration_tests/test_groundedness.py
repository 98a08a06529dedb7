"""`groundedness` ("measured" by default, "estimated", "off") through ChatAT2 (field, per call, bind, stream, the
micro-batched `batch`, documents located in the caller's prompt), AT2CallbackHandler and AT2Citations: the real
embedded model, real BM25 retrieval, real chains.

Measured groundedness pays one extra pass for a single-turn answer (every document removed) and one more in a
conversation (every earlier turn removed: `context_grounded`); "estimated" pays none; "off" gives `grounded` None."""

from __future__ import annotations

import uuid
from operator import itemgetter

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from pydantic import ValidationError

from at2_rag import InvalidInputError
from langchain_at2 import AT2CallbackHandler, AT2Citations, ChatAT2

pytestmark = pytest.mark.slow

QUESTION = "When was the Eiffel Tower completed?"
MAX_TOKENS = 12
PROMPT = ChatPromptTemplate.from_messages(
    [("system", "Answer from the context.\n\nContext:\n{context}"), ("human", "{question}")]
)


def format_docs(docs) -> str:
    return "\n\n".join(d.page_content for d in docs)


@pytest.fixture(scope="module")
def docs(bm25_retriever):
    return bm25_retriever.invoke(QUESTION)


@pytest.fixture(scope="module")
def measured(attributor, docs):
    """The default ChatAT2's answer (measured groundedness)."""
    return ChatAT2(max_tokens=MAX_TOKENS).invoke(QUESTION, documents=docs).response_metadata["at2"]


def check_mode(at2: dict, mode: str, passes: int) -> None:
    """`at2`: response_metadata["at2"] (or an event) of a single-turn answer attributed in `mode`."""
    assert at2["groundedness"] == mode and at2["extra_forward_passes"] == passes
    assert at2["citations"]
    for c in at2["citations"]:
        assert c["context_grounded"] is None  # no earlier turns
        if mode == "off":
            assert c["grounded"] is None and c["supported"] is True
        else:
            assert isinstance(c["grounded"], float)
            assert c["supported"] == (c["grounded"] >= at2["grounded_threshold"])
            assert c["supported"] or not c["cited"]


def test_chat_defaults_to_measured(measured) -> None:
    assert ChatAT2().groundedness == "measured"
    check_mode(measured, "measured", 1)
    # the answer depends on the Eiffel Tower document: removing it lowers the answer by more than the threshold
    assert measured["supported"] is True


def test_chat_field_per_call_and_bind(measured, docs) -> None:
    by_field = {}
    for mode in ("estimated", "off"):
        msg = ChatAT2(max_tokens=MAX_TOKENS, groundedness=mode).invoke(QUESTION, documents=docs)
        by_field[mode] = msg.response_metadata["at2"]
    check_mode(by_field["estimated"], "estimated", 0)
    check_mode(by_field["off"], "off", 0)
    for at2 in by_field.values():  # the setting changes `grounded`, not the scores
        assert at2["scores"] == pytest.approx(measured["scores"])
    default = ChatAT2(max_tokens=MAX_TOKENS)
    assert default.invoke(QUESTION, documents=docs, groundedness="estimated").response_metadata["at2"] == by_field[
        "estimated"
    ]
    assert default.bind(documents=docs, groundedness="off").invoke(QUESTION).response_metadata["at2"] == by_field["off"]
    # a per-call value overrides the field
    off = ChatAT2(max_tokens=MAX_TOKENS, groundedness="off")
    assert off.invoke(QUESTION, documents=docs, groundedness="measured").response_metadata["at2"] == measured


def test_chat_stream_and_batch_take_the_setting(measured, docs) -> None:
    llm = ChatAT2(max_tokens=MAX_TOKENS)
    streamed = list(llm.stream(QUESTION, documents=docs))[-1].response_metadata["at2"]
    check_mode(streamed, "measured", 1)
    assert [c["grounded"] for c in streamed["citations"]] == pytest.approx(
        [c["grounded"] for c in measured["citations"]], abs=1e-4
    )
    check_mode(list(llm.stream(QUESTION, documents=docs, groundedness="off"))[-1].response_metadata["at2"], "off", 0)
    # `batch` goes through the model's micro-batcher: each request keeps its own setting in one shared batch
    out = ChatAT2(max_tokens=MAX_TOKENS, groundedness="estimated").batch(
        [QUESTION, QUESTION], config={"max_concurrency": 2}, documents=docs
    )
    for msg in out:
        check_mode(msg.response_metadata["at2"], "estimated", 0)


def test_chat_located_prompt_takes_the_setting(docs) -> None:
    """Documents formatted into the caller's own prompt: the micro-batched call and the stream measure too."""
    messages = PROMPT.invoke({"context": format_docs(docs), "question": QUESTION}).to_messages()
    llm = ChatAT2(max_tokens=MAX_TOKENS)
    at2 = llm.invoke(messages, documents=docs).response_metadata["at2"]
    assert at2["mode"] == "prompt"
    check_mode(at2, "measured", 1)
    streamed = list(llm.stream(messages, documents=docs))[-1].response_metadata["at2"]
    check_mode(streamed, "measured", 1)
    assert [c["grounded"] for c in streamed["citations"]] == pytest.approx(
        [c["grounded"] for c in at2["citations"]], abs=1e-4
    )
    check_mode(list(llm.stream(messages, documents=docs, groundedness="estimated"))[-1].response_metadata["at2"],
               "estimated", 0)


def test_chat_conversation_measures_the_earlier_turns_too(docs) -> None:
    history = [HumanMessage(QUESTION), AIMessage("The Eiffel Tower was completed in 1889.")]
    msg = ChatAT2(max_tokens=MAX_TOKENS).invoke([*history, HumanMessage("Say that again.")], documents=docs)
    at2 = msg.response_metadata["at2"]
    assert at2["groundedness"] == "measured" and at2["extra_forward_passes"] == 2  # documents removed; turns removed
    assert at2["citations"]
    for c in at2["citations"]:
        assert isinstance(c["grounded"], float) and isinstance(c["context_grounded"], float)
        turns = [s for s in c["context"] if s["kind"] == "history"]
        assert bool(turns) == (c["context_grounded"] >= at2["grounded_threshold"])
    # the standard Citation annotations carry the same
    by_sentence = {(c["start"], c["end"]): c for c in at2["citations"]}
    for ann in msg.content_blocks[0].get("annotations", []):
        c = by_sentence[(ann["start_index"], ann["end_index"])]
        extras = ann["extras"]
        assert (extras["grounded"], extras["supported"], extras["context_grounded"]) == (
            c["grounded"],
            c["supported"],
            c["context_grounded"],
        )
        assert extras["groundedness"] == "measured"


@pytest.mark.parametrize("bad", ["exact", "", None, 1, "Measured"])
def test_chat_refuses_a_bad_setting(bad, docs) -> None:
    with pytest.raises(ValidationError, match="groundedness"):
        ChatAT2(groundedness=bad)
    with pytest.raises(InvalidInputError, match="groundedness must be one of 'measured', 'estimated', 'off'"):
        ChatAT2(max_tokens=MAX_TOKENS).invoke(QUESTION, documents=docs, groundedness=bad)


def test_callback_handler_takes_the_setting(bm25_retriever) -> None:
    chain = (
        {"context": bm25_retriever | format_docs, "question": RunnablePassthrough()}
        | PROMPT
        | ChatAT2(max_tokens=MAX_TOKENS, groundedness="off")  # the chain's own model: its setting is its own
        | StrOutputParser()
    )
    events = {}
    for mode in (None, "estimated", "off"):
        handler = AT2CallbackHandler() if mode is None else AT2CallbackHandler(groundedness=mode)
        assert handler.groundedness == (mode or "measured")
        run_id = uuid.uuid4()
        chain.invoke(QUESTION, config={"callbacks": [handler], "run_id": run_id})
        result = handler.results[run_id]
        assert result.error is None
        events[mode] = result.to_event()
    check_mode(events[None], "measured", 1)
    check_mode(events["estimated"], "estimated", 0)
    check_mode(events["off"], "off", 0)
    with pytest.raises(InvalidInputError, match="groundedness must be one of"):
        AT2CallbackHandler(groundedness="sometimes")


def test_citations_take_the_setting(bm25_retriever) -> None:
    chain = RunnablePassthrough.assign(context=itemgetter("question") | bm25_retriever)
    chain = chain.assign(
        prompt=lambda x: PROMPT.invoke({"context": format_docs(x["context"]), "question": x["question"]})
    )
    llm = ChatAT2(max_tokens=MAX_TOKENS)
    answered = chain.assign(answer=itemgetter("prompt") | llm | StrOutputParser()).invoke({"question": QUESTION})
    without_prompt = {k: v for k, v in answered.items() if k != "prompt"}
    assert AT2Citations().groundedness == "measured"
    for payload in (answered, without_prompt):  # attribute_rendered, then attribute
        outs = {mode: AT2Citations(groundedness=mode).invoke(payload) for mode in ("measured", "estimated", "off")}
        assert AT2Citations().invoke(payload)["citations"] == outs["measured"]["citations"]
        for mode, passes in (("measured", 1), ("estimated", 0), ("off", 0)):
            out = outs[mode]
            assert out["at2_error"] is None
            assert out["groundedness"] == out["attribution"].groundedness == mode
            assert out["extra_forward_passes"] == passes
            for c, full in zip(out["citations"], out["attribution"].citations):
                assert (c["grounded"], c["supported"], c["context_grounded"]) == (
                    full.grounded,
                    full.supported,
                    full.context_grounded,
                )
        assert all(c["grounded"] is None and c["supported"] for c in outs["off"]["citations"])
        assert outs["off"]["unsupported"] is False
    with pytest.raises(ValidationError, match="groundedness"):
        AT2Citations(groundedness="maybe")
