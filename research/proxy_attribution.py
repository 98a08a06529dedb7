"""Proxy attribution: what attributing model A's answer with another model B is worth.

Users of a hosted model attribute its answers with a local one (`attribute(answer=...)`, `instrument_at2`). The
ground truth is the answering model's own ablations, as `at2-rag evaluate --cache` measured them on held-out
examples (A's greedy answer, 32 random document masks per answer sentence, leave-one-out). Each attributing model
scores A's answer text with one forward pass of its own (its own prompt template, tokenizer and shipped estimator);
its per-sentence document scores are compared with A's measured effects exactly as `evaluate` compares A's own:

- LDS over A's LDS masks (all answer sentences, and the document-dependent ones: spread >= 1 nat);
- top-1 agreement: the proxy's highest-scored document (whole answer) is the one whose removal lowers A's answer
  most (A's leave-one-out, measured);
- top-1 drop: the drop of A's whole-answer log-probability when that document is removed (from the cached
  leave-one-out passes: no model pass of A is needed).

A's own estimator (`self`) and uniform average attention (of each model) are scored on the same examples. A
sentence of A's answer that B splits or tokenizes so that it owns no token of its own is left out for every method
alike (counted in the output).

    python -m research.proxy_attribution --answers gemma3-270m --cache data/eval-cache/gemma3-270m-heldout \\
        --examples data/rag_python_docs/heldout.jsonl --output docs/bench/proxy-gemma-answers.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from at2_rag import Attributor, ScoreEstimator
from at2_rag.capture.features import target_features
from at2_rag.capture.masked import target_log_odds, target_log_prob
from at2_rag.evaluation.ablation_cache import ExampleAblations
from at2_rag.evaluation.metrics import mean_se, nanmean
from at2_rag.evaluation.report import DEPENDENT_STD
from at2_rag.evidence.layout import source_layout
from at2_rag.examples import read_examples
from at2_rag.model_families import FAMILY_LOADERS
from at2_rag.models import load_default_model
from at2_rag.prompting.answer import answer_targets, decode_with_offsets
from at2_rag.stats import lds

logger = logging.getLogger(__name__)

MODELS = ("smollm2", "gemma3-270m")
METRICS = ("lds", "lds_dependent", "top1_agreement", "top1_drop")


def load(name: str) -> Attributor:
    """A model by its short name, with its shipped estimator."""
    model, tokenizer = load_default_model() if name == "smollm2" else FAMILY_LOADERS[name]()
    return Attributor(model, tokenizer)


def proxy_scores(att: Attributor, example: Any, text: str) -> tuple[dict[tuple[int, int], torch.Tensor],
                                                                    torch.Tensor, dict[tuple[int, int], torch.Tensor],
                                                                    torch.Tensor]:
    """B's document scores of A's answer `text`: per answer sentence (keyed by its char span) and for the whole
    answer, with B's estimator and with uniform average attention."""
    run = att.run(att.prepare({"query": example.query, "documents": example.documents, "history": example.history,
                               "answer": text}))
    assert run.answer.text == text, "the attributing model must score exactly the answering model's text"
    _, columns, _ = source_layout(run, "documents")
    features = run.token_features[:, columns]
    uniform = ScoreEstimator.uniform(att.num_layers, att.num_heads)
    targets = answer_targets(run.answer)
    every = [r for _, rows in targets for r in rows]

    def scored(estimator: ScoreEstimator) -> tuple[dict[tuple[int, int], torch.Tensor], torch.Tensor]:
        per = {(span.start, span.end): estimator(target_features(features, rows)).detach() for span, rows in targets}
        return per, estimator(target_features(features, every)).detach()

    own, own_whole = scored(att.estimator)
    flat, flat_whole = scored(uniform)
    return own, own_whole, flat, flat_whole


def example_metrics(scores: list[torch.Tensor], whole: torch.Tensor, data: ExampleAblations,
                    kept: list[int]) -> dict[str, float]:
    """LDS (all kept sentences, document-dependent ones), top-1 agreement and drop of one method on one example."""
    truths = [target_log_odds(data.lds_lp, data.target_rows[i]) for i in kept]
    values = [lds(s, data.lds_masks, y) for s, y in zip(scores, truths, strict=True)]
    dependent = [v for v, y in zip(values, truths, strict=True) if float(y.std()) >= DEPENDENT_STD]
    answer = data.target_rows[-1]
    full = float(target_log_prob(data.full_lp, answer))
    drops = torch.tensor([full - float(target_log_prob(lp, answer)) for lp in data.loo_lp])
    top = int(torch.argmax(whole.double()))
    return {"lds": nanmean(values), "lds_dependent": nanmean(dependent),
            "top1_agreement": float(top == int(torch.argmax(drops))), "top1_drop": float(drops[top])}


def study(answering: str, cache: Path, examples_path: Path, attributing: list[str], limit: int | None) -> dict:
    examples = {e.id: e for e in read_examples(str(examples_path))}
    cached = sorted((ExampleAblations.load(p) for p in cache.glob("*.safetensors")), key=lambda d: d.id)
    cached = [d for d in cached if d.id in examples][:limit]
    answerer = load(answering)
    others = {name: (answerer if name == answering else load(name)) for name in attributing}
    rows: list[dict[str, Any]] = []
    for data in tqdm(cached, desc=f"proxy[{answering} answers]"):
        example = examples[data.id]
        answer_len = data.full_lp.shape[0]
        answer = decode_with_offsets(answerer.tokenizer, data.input_ids[-answer_len:].tolist())
        own_targets = answer_targets(answer)
        if [rows_ for _, rows_ in own_targets] != data.target_rows[:-1]:
            raise RuntimeError(f"{data.id}: the cached targets are not {answering}'s sentences of its answer")
        spans = [(span.start, span.end) for span, _ in own_targets]
        proxies = {name: proxy_scores(att, example, answer.text) for name, att in others.items()}
        # sentences every attributing model scores on its own tokens: the same set for every method
        kept = [i for i, span in enumerate(spans) if all(span in p[0] for p in proxies.values())]
        if not kept:
            rows.append({"id": data.id, "sentences": len(spans), "kept": 0})
            continue
        self_scores = torch.stack([answerer.estimator(f) for f in data.features]).detach()
        uniform = ScoreEstimator.uniform(answerer.num_layers, answerer.num_heads)
        flat_self = torch.stack([uniform(f) for f in data.features]).detach()
        methods = {
            f"self: {answering} AT2": ([self_scores[i] for i in kept], self_scores[-1]),
            f"self: {answering} average attention": ([flat_self[i] for i in kept], flat_self[-1]),
        }
        for name, (own, own_whole, flat, flat_whole) in proxies.items():
            if name == answering:
                continue
            methods[f"proxy: {name} AT2"] = ([own[spans[i]] for i in kept], own_whole)
            methods[f"proxy: {name} average attention"] = ([flat[spans[i]] for i in kept], flat_whole)
        rows.append({"id": data.id, "sentences": len(spans), "kept": len(kept),
                     "methods": {m: example_metrics(s, w, data, kept) for m, (s, w) in methods.items()}})
    scored = [r for r in rows if r.get("methods")]
    return {"answering_model": answering, "examples": str(examples_path), "cache": str(cache),
            "num_examples": len(rows), "num_scored": len(scored),
            "sentences": sum(r["sentences"] for r in rows), "sentences_kept": sum(r["kept"] for r in rows),
            **summarize(scored, f"self: {answering} AT2"), "rows": rows}


def summarize(scored: list[dict[str, Any]], reference: str) -> dict[str, Any]:
    """Mean ± standard error over examples of every method and metric, and each method's paired difference to
    `reference` (the answering model attributing itself) on the same examples."""
    names = list(scored[0]["methods"]) if scored else []

    def values(method: str, key: str) -> list[float]:
        return [r["methods"][method][key] for r in scored]

    def finite(v: list[float]) -> list[float]:
        return [x for x in v if not math.isnan(x)]

    summary = {m: {k: mean_se(finite(values(m, k))) for k in METRICS} for m in names}
    paired = {m: {k: mean_se(finite([a - b for a, b in zip(values(m, k), values(reference, k), strict=True)]))
                  for k in METRICS} for m in names if m != reference}
    return {"summary": summary, "paired_difference_to": reference, "paired": paired}


def plot_results(paths: list[Path], out: Path) -> None:
    """One panel per metric (LDS, top-1 agreement), one group of bars per answering model: itself and each
    proxy, with AT2 and average attention, mean ± standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(p.read_text()) for p in paths]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (key, label) in zip(axes, (("lds", "LDS, all answer sentences"), ("top1_agreement", "top-1 agreement"))):
        for g, result in enumerate(results):
            names = list(result["summary"])
            width = 0.8 / len(names)
            for i, name in enumerate(names):
                v = result["summary"][name][key]
                color = ("tab:red" if "AT2" in name else "tab:gray") if name.startswith("self") else \
                    ("tab:blue" if "AT2" in name else "tab:cyan")
                ax.bar(g + (i - (len(names) - 1) / 2) * width, v["mean"], width, yerr=v["se"], capsize=3,
                       color=color, label=name.split(": ")[0] + ": " + ("AT2" if "AT2" in name else "average attention")
                       if g == 0 else None)
        ax.set_xticks(range(len(results)))
        ax.set_xticklabels([f"{r['answering_model']} answers\n({r['num_scored']} held-out)" for r in results])
        ax.set_title(label)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Proxy attribution: each answer attributed by its own model (self) and by the other (proxy)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--answers", choices=MODELS, help="the model whose answers are attributed")
    parser.add_argument("--cache", type=Path, help="its `at2-rag evaluate --cache` folder")
    parser.add_argument("--examples", type=Path, help="the held-out examples that cache is of")
    parser.add_argument("--attributing", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--limit", type=int)
    parser.add_argument("--output", type=Path, help="JSON of the study (or, with --plot-from, the plot)")
    parser.add_argument("--plot-from", nargs="+", type=Path, help="draw --output from these study JSONs instead")
    args = parser.parse_args(argv)
    if args.output is None:
        parser.error("--output is required")
    if args.plot_from:
        plot_results(args.plot_from, args.output)
        return 0
    if not (args.answers and args.cache and args.examples):
        parser.error("--answers, --cache and --examples are required (or --plot-from)")
    logging.basicConfig(level=logging.INFO)
    result = study(args.answers, args.cache, args.examples, args.attributing, args.limit)
    args.output.write_text(json.dumps(result, indent=2))
    for method, values in result["summary"].items():
        print(f"{method:45s} " + "  ".join(f"{k} {v['mean']:.3f} ± {v['se']:.3f}" for k, v in values.items()))
    for method, values in result["paired"].items():
        print(f"{method + ' - self':45s} " + "  ".join(f"{k} {v['mean']:+.3f} ± {v['se']:.3f}"
                                                       for k, v in values.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
