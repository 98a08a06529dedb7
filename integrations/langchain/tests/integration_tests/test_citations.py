"""AT2Citations after real RAG chains (BM25 and MiniLM-embedding retrieval, the real model)."""

from __future__ import annotations

import copy
from operator import itemgetter

import pytest
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore

from at2_rag.attribution.scoring import Scorer
from langchain_at2 import AT2Citations, ChatAT2, with_citations

pytestmark = pytest.mark.slow

PROMPT = ChatPromptTemplate.from_messages(
    [("system", "Answer briefly from the context.\n\nContext:\n{context}"), ("human", "{question}")]
)


def format_docs(docs: list[Document]) -> str:
    return "\n\n".join(d.page_content for d in docs)


def rag_chain(retriever, llm, keep_prompt: bool = False):
    """question -> {"question", "context": [Document], "answer": str} (+ "prompt" when keep_prompt)."""
    chain = RunnablePassthrough.assign(context=itemgetter("question") | retriever)
    def prompt(x: dict) -> object:
        return PROMPT.invoke({"context": format_docs(x["context"]), "question": x["question"]})

    if keep_prompt:
        return chain.assign(prompt=prompt).assign(answer=itemgetter("prompt") | llm | StrOutputParser())
    return chain.assign(answer=prompt | llm | StrOutputParser())


@pytest.fixture(scope="module")
def llm(attributor) -> ChatAT2:
    return ChatAT2(max_tokens=20)


def test_scored_documents_and_citations(bm25_retriever, llm, attributor) -> None:
    out = (rag_chain(bm25_retriever, llm) | AT2Citations()).invoke({"question": "How tall is Mount Everest?"})
    docs = out["context"]
    assert [d.id for d in docs] == [d.id for d in bm25_retriever.invoke("How tall is Mount Everest?")]
    scores = {d.id: d.metadata["at2_score"] for d in docs}
    assert all(isinstance(s, float) for s in scores.values())
    assert max(scores, key=scores.get) == "mount-everest"
    assert out["citations"] and out["at2_error"] is None
    for c in out["citations"]:
        assert out["answer"][c["start"] : c["end"]] == c["text"]
        assert set(c["document_ids"]) <= set(scores) and set(c["scores"]) == set(scores)
    assert out["unsupported"] == (not out["attribution"].supported)
    assert out["attribution"].answer == out["answer"]
    assert out["cited_answer"].startswith(out["answer"][: out["citations"][0]["end"]])


def test_unsupported_follows_the_grounded_threshold(bm25_retriever, llm, attributor) -> None:
    chain = rag_chain(bm25_retriever, llm)
    answer = chain.invoke({"question": "How long is a marathon?"})
    def with_thresholds(grounded: float, support: float | None = None):  # same model, the scorer's policy changed
        other = copy.copy(attributor)
        other.scorer = Scorer(attributor.estimator, support, grounded)
        return other

    strict = with_thresholds(1e6)  # no sentence can depend on the documents that much
    lenient = with_thresholds(-1e6, 0.0)
    assert AT2Citations(attributor=strict).invoke(answer)["unsupported"] is True
    out = AT2Citations(attributor=lenient).invoke(answer)
    assert out["unsupported"] is False and all(c["document_ids"] for c in out["citations"])
    # nothing to attribute: unsupported, with the reason
    empty = AT2Citations().invoke({**answer, "context": []})
    assert empty["unsupported"] is True and empty["at2_error"] == "no documents" and empty["citations"] == []


def test_reads_the_chains_own_prompt_when_given(bm25_retriever, llm) -> None:
    chain = with_citations(rag_chain(bm25_retriever, llm, keep_prompt=True))
    out = chain.invoke({"question": "Who discovered penicillin?"})
    assert out["at2_error"] is None
    assert "Answer briefly from the context." in out["attribution"].prompt
    scores = {d.id: d.metadata["at2_score"] for d in out["context"]}
    assert max(scores, key=scores.get) == "penicillin"


def test_with_minilm_embeddings_retriever(corpus, minilm, llm) -> None:
    store = InMemoryVectorStore(minilm)
    store.add_documents(corpus)
    retriever = store.as_retriever(search_kwargs={"k": 2})
    question = "Which insects communicate with a dance?"
    assert retriever.invoke(question)[0].id == "honeybees"
    out = with_citations(rag_chain(retriever, llm)).invoke({"question": question})
    scores = {d.id: d.metadata["at2_score"] for d in out["context"]}
    assert len(scores) == 2 and "honeybees" in scores
