"""`ablations=k` through ChatAT2, AT2CallbackHandler and AT2Citations: real model, real BM25 retrieval, real chains.

Every call here measures groundedness (the default): one pass with the document removed. The retriever finds one
document for QUESTION, whose 2 distinct masks (kept: the run itself; removed: the measured pass) are both already
measured, so `ablations=k` refines the scores at no pass beyond the measured one; with groundedness "off" the
removed mask is paid as an ablation pass."""

from __future__ import annotations

import uuid
from operator import itemgetter

import pytest
from langchain_core.messages import HumanMessage
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
    return bm25_retriever.invoke(QUESTION)  # 3 documents


@pytest.fixture(scope="module")
def plain(attributor, docs):
    """The default ChatAT2 (no `ablations` given) and its answer."""
    llm = ChatAT2(max_tokens=MAX_TOKENS)
    return llm, llm.invoke(QUESTION, documents=docs)


@pytest.fixture(scope="module")
def refined(attributor, docs):
    llm = ChatAT2(max_tokens=MAX_TOKENS, ablations=2)
    return llm, llm.invoke(QUESTION, documents=docs)


def test_chat_default_is_plain_at2_and_identical_to_ablations_0(plain, docs) -> None:
    llm, msg = plain
    assert llm.ablations == 0
    at2 = msg.response_metadata["at2"]
    assert at2["extra_forward_passes"] == 1 and at2["groundedness"] == "measured"  # the measured pass, no ablation
    explicit = ChatAT2(max_tokens=MAX_TOKENS, ablations=0).invoke(QUESTION, documents=docs)
    assert explicit.text == msg.text and explicit.response_metadata["at2"] == at2


def test_chat_field_refines_the_scores(plain, refined) -> None:
    _, msg0 = plain
    _, msg2 = refined
    at0, at2 = msg0.response_metadata["at2"], msg2.response_metadata["at2"]
    assert msg2.text == msg0.text  # greedy: the passes change the scores, not the answer
    assert at2["extra_forward_passes"] == 1 and at2["mode"] == "template"  # both masks already measured
    assert set(at2["scores"]) == set(at0["scores"])
    assert at2["scores"] != at0["scores"]
    # the annotations are built from the refined scores
    scores = {a["extras"]["document_id"]: a["extras"]["score"] for a in msg2.content_blocks[0].get("annotations", [])}
    per_sentence = {d["id"]: d["score"] for c in at2["citations"] for d in c["documents"] if d["id"] in c["cited"]}
    assert scores == per_sentence


def test_chat_per_call_bind_and_stream(plain, refined, docs) -> None:
    llm0, msg0 = plain
    _, msg2 = refined
    want = msg2.response_metadata["at2"]
    assert llm0.invoke(QUESTION, documents=docs, ablations=2).response_metadata["at2"] == want
    assert llm0.bind(documents=docs, ablations=2).invoke(QUESTION).response_metadata["at2"] == want
    chunks = list(llm0.stream(QUESTION, documents=docs, ablations=2))
    assert chunks[-1].response_metadata["at2"] == want
    # a per-call 0 overrides the field
    llm2 = ChatAT2(max_tokens=MAX_TOKENS, ablations=2)
    assert llm2.invoke(QUESTION, documents=docs, ablations=0).response_metadata["at2"] == msg0.response_metadata["at2"]
    # without the measured pass, the removed mask is an ablation pass of its own
    off = [
        llm0.invoke(QUESTION, documents=docs, ablations=k, groundedness="off").response_metadata["at2"] for k in (0, 2)
    ]
    assert [at2["extra_forward_passes"] for at2 in off] == [0, 1]
    assert off[1]["scores"] == pytest.approx(want["scores"], abs=1e-5)  # the same masks, the same refinement


def test_chat_prompt_mode_and_cap(attributor, docs) -> None:
    """Documents located in the caller's own prompt (generate_prompt_run + build_attribution) get the passes too;
    one document has only 2 distinct masks, so k is capped at 2."""
    messages = PROMPT.invoke({"context": format_docs(docs), "question": QUESTION}).to_messages()
    llm = ChatAT2(max_tokens=MAX_TOKENS)
    at0 = llm.invoke(messages, documents=docs).response_metadata["at2"]
    at2 = llm.invoke(messages, documents=docs, ablations=2).response_metadata["at2"]
    assert at0["mode"] == at2["mode"] == "prompt"
    assert (at0["extra_forward_passes"], at2["extra_forward_passes"]) == (1, 1)  # the measured pass
    assert at2["scores"] != at0["scores"]
    one = llm.invoke(
        [HumanMessage(f"{docs[0].page_content}\n\n{QUESTION}")], documents=docs[:1], ablations=5, groundedness="off"
    )
    assert one.response_metadata["at2"]["extra_forward_passes"] == 1  # capped at 2 masks, one of them the run


@pytest.mark.parametrize("bad", [-1, True, 1.5, "2"])
def test_chat_rejects_bad_ablations(bad, docs) -> None:
    with pytest.raises(ValidationError, match="ablations"):
        ChatAT2(ablations=bad)
    with pytest.raises(InvalidInputError, match="ablations must be a non-negative integer"):
        ChatAT2(max_tokens=MAX_TOKENS).invoke(QUESTION, documents=docs, ablations=bad)


def test_callback_handler_forwards_ablations(bm25_retriever) -> None:
    chain = (
        {"context": bm25_retriever | format_docs, "question": RunnablePassthrough()}
        | PROMPT
        | ChatAT2(max_tokens=MAX_TOKENS)
        | StrOutputParser()
    )
    results = {}
    for k in (None, 0, 2):
        handler = AT2CallbackHandler() if k is None else AT2CallbackHandler(ablations=k)
        run_id = uuid.uuid4()
        chain.invoke(QUESTION, config={"callbacks": [handler], "run_id": run_id})
        result = handler.results[run_id]
        assert result.error is None
        results[k] = result
    assert results[None].attribution.extra_forward_passes == 1  # the measured pass
    ids = ("run_id", "llm_run_id")
    assert {k: v for k, v in results[None].to_event().items() if k not in ids} == {
        k: v for k, v in results[0].to_event().items() if k not in ids
    }
    event = results[2].to_event()
    assert event["extra_forward_passes"] == 1 and results[0].to_event()["extra_forward_passes"] == 1
    assert results[2].answer == results[0].answer and results[2].scores != results[0].scores
    with pytest.raises(InvalidInputError, match="ablations"):
        AT2CallbackHandler(ablations=-1)


def test_citations_forward_ablations(bm25_retriever) -> None:
    llm = ChatAT2(max_tokens=MAX_TOKENS)
    chain = RunnablePassthrough.assign(context=itemgetter("question") | bm25_retriever)
    chain = chain.assign(
        prompt=lambda x: PROMPT.invoke({"context": format_docs(x["context"]), "question": x["question"]})
    )
    answered = chain.assign(answer=itemgetter("prompt") | llm | StrOutputParser()).invoke({"question": QUESTION})
    without_prompt = {k: v for k, v in answered.items() if k != "prompt"}
    for payload in (answered, without_prompt):  # attribute_rendered, then attribute
        default, zero, two = (AT2Citations(**kw).invoke(payload) for kw in ({}, {"ablations": 0}, {"ablations": 2}))
        assert default["at2_error"] is None and two["at2_error"] is None
        assert default["extra_forward_passes"] == zero["extra_forward_passes"] == 1  # the measured pass
        assert default["citations"] == zero["citations"]
        assert two["extra_forward_passes"] == two["attribution"].extra_forward_passes == 1
        scores = {d.id: d.metadata["at2_score"] for d in two["context"]}
        assert scores == two["attribution"].document_scores()
        assert scores != {d.id: d.metadata["at2_score"] for d in default["context"]}
    with pytest.raises(ValidationError, match="ablations"):
        AT2Citations(ablations=-1)
