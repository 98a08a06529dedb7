"""LangGraph RAG with AT2 attribution, offline: retrieve -> answer -> grade (-> answer again), one handler.

    python examples/langgraph_rag.py "Who discovered penicillin?"
    python examples/langgraph_rag.py "How tall is Mount Everest?" --max-attempts 1

A small LangGraph graph: `retrieve` (BM25 over the test corpus), `answer` (a chat model over a ChatPromptTemplate
that formats the documents into its system message), `grade` (the model asked whether the answer answers the
question; "no" sends the graph back to `answer` until `--max-attempts`). One `AT2CallbackHandler` on the graph
attributes every model call: each `answer` node's call gets its own attribution (`handler.calls[root]`, with
`run_metadata["langgraph_node"]`), the grader's calls report that the documents are not in their prompt, and
`handler.results[root]` is the last answer from the documents, never the grader's call.

Needs: pip install -e . && pip install -e "integrations/langchain[test]" (langgraph, bm25s) and
`at2-rag download-model` once for the embedded model.
"""

from __future__ import annotations

import argparse
import logging
import operator
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, TypedDict

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the model ships inside a package

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from langchain_core.documents import Document  # noqa: E402
from langchain_core.language_models import BaseChatModel  # noqa: E402
from langchain_core.messages import HumanMessage  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.retrievers import BaseRetriever  # noqa: E402

logger = logging.getLogger("langgraph_rag")

ANSWER_PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "Answer the question using only the context below. Be concise.{retry}\n\nContext:\n{context}"),
        ("human", "{question}"),
    ]
)
RETRY_NOTE = " An earlier answer was judged not to answer the question: answer it directly."


class RAGState(TypedDict, total=False):
    question: str
    documents: list[Document]
    answers: Annotated[list[str], operator.add]
    grades: Annotated[list[str], operator.add]


def format_docs(docs: list[Document]) -> str:
    return "\n\n".join(f"[{i}] {d.page_content}" for i, d in enumerate(docs, 1))


def build_graph(
    retriever: BaseRetriever, llm: BaseChatModel, grader: BaseChatModel | None = None, max_attempts: int = 2
) -> Any:
    """The compiled graph: retrieve -> answer -> grade -> (answer again while graded "no", up to max_attempts)."""
    from langgraph.graph import END, START, StateGraph

    grader = grader or llm

    def retrieve(state: RAGState) -> dict[str, Any]:
        return {"documents": retriever.invoke(state["question"])}

    def answer(state: RAGState) -> dict[str, Any]:
        retry = RETRY_NOTE if state.get("answers") else ""
        messages = ANSWER_PROMPT.invoke(
            {"context": format_docs(state["documents"]), "question": state["question"], "retry": retry}
        )
        return {"answers": [llm.invoke(messages).text.strip()]}

    def grade(state: RAGState) -> dict[str, Any]:
        question = (
            f"Question: {state['question']}\nAnswer: {state['answers'][-1]}\n"
            "Does the answer answer the question? Reply with one word: yes or no."
        )
        return {"grades": [grader.invoke([HumanMessage(question)]).text.strip().lower()]}

    def route(state: RAGState) -> str:
        said_yes = state["grades"][-1].startswith("yes")
        return END if said_yes or len(state["answers"]) >= max_attempts else "answer"

    graph = StateGraph(RAGState)
    graph.add_node("retrieve", retrieve)
    graph.add_node("answer", answer)
    graph.add_node("grade", grade)
    graph.add_edge(START, "retrieve")
    graph.add_edge("retrieve", "answer")
    graph.add_edge("answer", "grade")
    graph.add_conditional_edges("grade", route, ["answer", END])
    return graph.compile()


def main(argv: list[str] | None = None) -> int:
    from examples.langchain_rag import DEFAULT_CORPUS, BM25SRetriever, load_corpus
    from langchain_at2 import AT2CallbackHandler, ChatAT2

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("question", nargs="?", default="Who discovered penicillin?")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="a .jsonl file or a folder of .txt/.md")
    parser.add_argument("--k", type=int, default=3, help="documents to retrieve")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-attempts", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    start = time.perf_counter()
    retriever = BM25SRetriever(documents=load_corpus(args.corpus), k=args.k)
    graph = build_graph(retriever, ChatAT2(max_tokens=args.max_tokens), ChatAT2(max_tokens=4), args.max_attempts)
    handler = AT2CallbackHandler()
    run_id = uuid.uuid4()
    state = graph.invoke({"question": args.question}, config={"callbacks": [handler], "run_id": run_id})

    logger.info("Q: %s", args.question)
    for call in handler.calls[run_id]:
        node = call.run_metadata.get("langgraph_node")
        if call.attribution is None:
            logger.info("\n[%s] %r: no attribution (%s)", node, call.answer, call.error)
            continue
        logger.info("\n[%s] %s", node, call.attribution.cited_answer())
        for d in call.attribution.top_documents(len(call.attribution.documents)):
            logger.info("   %8.4f  [%d] %s", d.score, d.index + 1, d.title or d.id)
    final = handler.results[run_id]
    logger.info("\nfinal answer (node %s): %s", final.run_metadata.get("langgraph_node"), state["answers"][-1])
    logger.info("grades: %s  (%.1f s)", state["grades"], time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
