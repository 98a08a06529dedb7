"""Context pruning with AT2: keep only the top-k nodes and the answer stays (almost) as likely.

For each query: retrieve N nodes (default 8) with a real LlamaIndex retriever, generate the answer with the full
context (the embedded SmolLM2-135M-Instruct, attention captured, attribution from the same run), then score the
*same answer tokens* teacher-forced (one forward pass) under:

  full         all N nodes
  AT2 top-k    the k nodes AT2NodePostprocessor(mode="filter", top_k=k) keeps
  retr top-k   the k nodes with the highest retriever score
  random k     k random nodes (mean over --random-draws draws)
  AT2 rel>=r   AT2NodePostprocessor(mode="filter", relative_threshold=r): adaptive k

and report the mean drop in the answer's log-probability (sum of token log-probs; full minus pruned, so lower
is better) and the fraction of nodes / prompt tokens dropped. Kept nodes stay in the retriever's order.
Everything is measured in one run; only log-probs and ratios are reported (no timings).

    python bench/pruning.py                 # writes docs/pruning.json and docs/pruning.png
    python bench/pruning.py --retriever bm25 --top-n 8 --ks 1,2,4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "integrations" / "llamaindex" / "tests" / "data" / "corpus"

# (query, id of the node that holds the answer) - the corpus has one paragraph per topic
QUERIES = [
    ("When was the Eiffel Tower completed?", "eiffel_tower-0"),
    ("Who made the first confirmed ascent of Mount Everest?", "mount_everest-0"),
    ("Who discovered penicillin?", "penicillin-0"),
    ("What are the names of the two moons of Mars?", "mars-0"),
    ("Who created the Python programming language?", "python_language-0"),
    ("How many squares does a chess board have?", "chess-0"),
    ("Where is coffee believed to have come from?", "coffee-0"),
    ("What do blue whales eat?", "blue_whale-0"),
    ("What was Tokyo called before 1868?", "tokyo-0"),
    ("Who was the first person to walk on the Moon?", "moon_landing-0"),
    ("Which Roman town did Mount Vesuvius bury?", "volcanoes-0"),
    ("How do worker bees tell other bees where flowers are?", "honey_bees-0"),
]


def local_setup():
    """`examples/llamaindex_rag.py`'s offline LlamaIndex helpers (folder loader, local `Settings`): the package
    exports only its components; the integration's tests import the same functions from there."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from examples import llamaindex_rag

    return llamaindex_rag


def load_nodes(directory: Path):
    from llama_index.core.node_parser import SentenceSplitter

    load_folder = local_setup().load_folder

    splitter = SentenceSplitter(chunk_size=256, chunk_overlap=0, id_func=lambda i, doc: f"{doc.node_id}-{i}")
    return splitter.get_nodes_from_documents(load_folder(directory))


def answer_logprob(attributor: Any, query: str, documents: Sequence[Any], answer_ids: Sequence[int]) -> float:
    """Sum of the answer tokens' log-probabilities given the prompt built from `documents`, teacher-forced in
    one forward pass (the prompt is rendered exactly as for generation)."""
    import torch

    prompt = attributor.render(query, documents)
    ids = torch.tensor([prompt.input_ids + list(answer_ids)], device=attributor.model.device)
    start = prompt.num_tokens - 1  # the position that predicts the first answer token
    with torch.no_grad():
        logits = attributor.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    logp = torch.log_softmax(logits[0, start : start + len(answer_ids)].float(), dim=-1)
    target = torch.tensor(list(answer_ids), device=logp.device)
    return float(logp.gather(1, target[:, None]).sum())


def prompt_tokens(attributor: Any, query: str, documents: Sequence[Any]) -> int:
    return attributor.render(query, documents).num_tokens


def run(args: argparse.Namespace) -> dict[str, Any]:
    import random

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from at2_rag import map_documents
    from llama_index.postprocessor.at2 import AT2NodePostprocessor
    from llama_index.postprocessor.at2._common import annotate_nodes  # what AT2NodePostprocessor computes

    use_local_settings = local_setup().use_local_settings

    attributor = None
    if args.estimator:  # e.g. a trained estimator folder; default: the one shipped for the model, else uniform
        from at2_rag import Attributor, get_attributor

        base = get_attributor()
        attributor = Attributor(base.model, base.tokenizer, estimator=args.estimator)
    attributor = use_local_settings(attributor, embed_model="minilm" if args.retriever == "vector" else None)
    nodes = load_nodes(args.data)
    if args.retriever == "bm25":
        from llama_index.retrievers.bm25 import BM25Retriever

        retriever = BM25Retriever.from_defaults(nodes=nodes, similarity_top_k=args.top_n)
    else:
        from llama_index.core import VectorStoreIndex

        retriever = VectorStoreIndex(nodes).as_retriever(similarity_top_k=args.top_n)

    rng = random.Random(args.seed)
    ks = [int(k) for k in args.ks.split(",")]
    per_query: list[dict[str, Any]] = []
    for qi, (query, gold) in enumerate(QUERIES[: args.queries]):
        retrieved = retriever.retrieve(query)
        n = len(retrieved)
        docs = map_documents(list(retrieved)).documents  # the postprocessor's node -> Document mapping
        captured = attributor.run(attributor.prepare(query, docs, max_new_tokens=args.max_new_tokens))
        attribution = attributor.score(captured)  # document scores; no extra passes
        answer_ids = captured.answer.token_ids
        annotated = annotate_nodes(retrieved, attribution)  # what AT2NodePostprocessor computes

        def subset(ids: Sequence[str]) -> list[Any]:
            keep = set(ids)
            return [d for d in docs if d.id in keep]  # the retriever's order

        full_lp = answer_logprob(attributor, query, docs, answer_ids)
        full_tokens = prompt_tokens(attributor, query, docs)
        conditions: dict[str, dict[str, Any]] = {}

        def record(name: str, kept_ids: Sequence[str]) -> None:
            kept_docs = subset(kept_ids)
            lp = answer_logprob(attributor, query, kept_docs, answer_ids)
            conditions[name] = {
                "kept": list(kept_ids),
                "logprob": lp,
                "drop": full_lp - lp,
                "nodes_dropped": 1 - len(kept_docs) / n,
                "tokens_dropped": 1 - prompt_tokens(attributor, query, kept_docs) / full_tokens,
            }

        by_retrieval = [r.node.node_id for r in retrieved]  # retrievers return best first
        for k in ks:
            pp = AT2NodePostprocessor(attributor, mode="filter", top_k=k)
            record(f"AT2 top-{k}", [x.node.node_id for x in pp.select(annotated)])
            record(f"retriever top-{k}", by_retrieval[:k])
            draws = []
            for _ in range(args.random_draws):
                ids = rng.sample(by_retrieval, k)
                kept_docs = subset(ids)
                draws.append(full_lp - answer_logprob(attributor, query, kept_docs, answer_ids))
            conditions[f"random {k}"] = {
                "drop": statistics.fmean(draws),
                "draws": draws,
                "nodes_dropped": 1 - k / n,
                "tokens_dropped": None,
            }
        rel = AT2NodePostprocessor(attributor, mode="filter", relative_threshold=args.relative_threshold)
        record(f"AT2 rel>={args.relative_threshold:g}", [x.node.node_id for x in rel.select(annotated)])

        ranking = [x.node.node_id for x in sorted(annotated, key=lambda x: x.score, reverse=True)]
        row = {
            "query": query,
            "gold": gold,
            "answer": attribution.answer,
            "answer_tokens": len(answer_ids),
            "retrieved": by_retrieval,
            "at2_scores": attribution.document_scores(),
            "at2_ranking": ranking,
            "gold_retrieved": gold in by_retrieval,
            "gold_at2_top1": bool(ranking) and ranking[0] == gold,
            "gold_retriever_top1": bool(by_retrieval) and by_retrieval[0] == gold,
            "full_logprob": full_lp,
            "conditions": conditions,
        }
        per_query.append(row)
        print(
            f"[{qi + 1:>2}/{min(args.queries, len(QUERIES))}] {query!r}: answer {len(answer_ids)} tokens, "
            f"log p full {full_lp:.2f}, AT2 top-1 {ranking[0]}"
            + "".join(f", drop@{name} {c['drop']:.2f}" for name, c in conditions.items() if "top-1" in name),
            flush=True,
        )

    names = list(per_query[0]["conditions"])
    summary = {}
    for name in names:
        drops = [q["conditions"][name]["drop"] for q in per_query]
        nodes_dropped = [q["conditions"][name]["nodes_dropped"] for q in per_query]
        tokens = [q["conditions"][name]["tokens_dropped"] for q in per_query]
        summary[name] = {
            "mean_logprob_drop": statistics.fmean(drops),
            "median_logprob_drop": statistics.median(drops),
            "mean_nodes_dropped": statistics.fmean(nodes_dropped),
            "mean_tokens_dropped": statistics.fmean(tokens) if all(t is not None for t in tokens) else None,
        }
    return {
        "settings": {
            "model": attributor.model_id,
            "estimator": repr(attributor.estimator),
            "estimator_trained": bool(attributor.estimator.trained),
            "retriever": args.retriever,
            "nodes_retrieved": args.top_n,
            "queries": len(per_query),
            "ks": ks,
            "random_draws": args.random_draws,
            "max_new_tokens": args.max_new_tokens,
            "relative_threshold": args.relative_threshold,
            "seed": args.seed,
            "logprob": "sum of the answer's token log-probs, teacher-forced; drop = full - pruned",
        },
        "summary": summary,
        "gold": {
            "retrieved": statistics.fmean(q["gold_retrieved"] for q in per_query),
            "at2_top1": statistics.fmean(q["gold_at2_top1"] for q in per_query),
            "retriever_top1": statistics.fmean(q["gold_retriever_top1"] for q in per_query),
        },
        "mean_full_logprob": statistics.fmean(q["full_logprob"] for q in per_query),
        "queries": per_query,
    }


def print_table(result: dict[str, Any]) -> None:
    s = result["settings"]
    print(
        f"\n{s['queries']} queries, {s['nodes_retrieved']} nodes retrieved ({s['retriever']}), "
        f"estimator: {'trained' if s['estimator_trained'] else 'UNTRAINED (average attention)'}"
    )
    print(f"mean log p(answer | full context) = {result['mean_full_logprob']:.2f}\n")
    print(f"{'condition':<18} {'mean drop':>10} {'median drop':>12} {'nodes dropped':>14} {'tokens dropped':>15}")
    for name, row in result["summary"].items():
        tokens = row["mean_tokens_dropped"]
        tokens_s = f"{tokens:15.0%}" if tokens is not None else f"{'-':>15}"
        print(
            f"{name:<18} {row['mean_logprob_drop']:10.2f} {row['median_logprob_drop']:12.2f} "
            f"{row['mean_nodes_dropped']:14.0%}{tokens_s}"
        )
    g = result["gold"]
    print(
        f"\nanswer-bearing node: retrieved {g['retrieved']:.0%}, AT2 top-1 {g['at2_top1']:.0%}, "
        f"retriever top-1 {g['retriever_top1']:.0%}"
    )


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = result["settings"]["ks"]
    trained = result["settings"]["estimator_trained"]
    at2_label = "AT2" if trained else "AT2 (untrained estimator:\naverage attention)"
    methods = [("AT2 top-{k}", at2_label, "#e67e22"), ("retriever top-{k}", "retriever score", "#3498db"),
               ("random {k}", "random", "#95a5a6")]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    width = 0.8 / len(methods)
    for j, (pattern, label, color) in enumerate(methods):
        values = [result["summary"][pattern.format(k=k)]["mean_logprob_drop"] for k in ks]
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(ks))]
        ax.bar(xs, values, width, label=label, color=color)
        for x, v in zip(xs, values):
            ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    n = result["settings"]["nodes_retrieved"]
    ax.set_xticks(range(len(ks)), [f"keep {k} of {n}\n({1 - k / n:.0%} dropped)" for k in ks])
    ax.set_ylabel("mean drop in answer log-prob\n(full - pruned, lower is better)")
    ax.set_title(
        f"Context pruning, {result['settings']['queries']} queries, {result['settings']['retriever']} retriever, "
        "SmolLM2-135M-Instruct",
        fontsize=9,
    )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--retriever", choices=["vector", "bm25"], default="vector")
    parser.add_argument("--top-n", type=int, default=8, help="nodes retrieved per query")
    parser.add_argument("--ks", default="1,2", help="comma-separated numbers of nodes to keep")
    parser.add_argument("--queries", type=int, default=len(QUERIES))
    parser.add_argument("--random-draws", type=int, default=5)
    parser.add_argument("--relative-threshold", type=float, default=0.5)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--estimator", default=None, help="AT2 estimator folder / file / Hub id (default: shipped)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for pruning.json / pruning.png")
    parser.add_argument("--from-json", type=Path, default=None, help="re-print / re-plot saved results, no model")
    args = parser.parse_args(argv)

    result = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    print_table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.from_json:
        (args.out / "pruning.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "pruning.png")
    print(f"\nwrote {args.out / 'pruning.json'} and {args.out / 'pruning.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
