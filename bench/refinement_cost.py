"""What `ablations=k` costs: the refinement's time (k ablation passes with shared prompt prefixes, plus the fit)
as a multiple of one plain forward pass over the same prompt + answer, on held-out examples, in one run.

    python bench/refinement_cost.py --examples 4 --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from at2_rag import Attributor, load_default_model
from at2_rag.training.data import read_examples

BUDGETS = (2, 4, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heldout", default="data/rag_python_docs/heldout.jsonl")
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="docs/bench/refinement_cost.json")
    args = parser.parse_args()
    model, tokenizer = load_default_model()
    attributor = Attributor(model, tokenizer)
    ratios: dict[int, list[float]] = {k: [] for k in BUDGETS}
    for example in read_examples(args.heldout)[: args.examples]:
        request = {"query": example.query, "documents": example.documents}
        run = attributor.run(attributor.prepare(request, max_new_tokens=48))
        ids = torch.tensor([run.prompt.input_ids + run.answer.token_ids])
        for _ in range(args.reps):
            with torch.no_grad():
                start = time.perf_counter()
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
                plain = time.perf_counter() - start
            for k in BUDGETS:
                start = time.perf_counter()
                attributor.score(run, attributor.ablate(run, k))  # k passes + the fit
                with_k = time.perf_counter() - start
                start = time.perf_counter()
                attributor.score(run)  # zero passes (groundedness "estimated", as when the numbers were recorded)
                base = time.perf_counter() - start
                ratios[k].append((with_k - base) / plain)
        print(example.id, {k: round(statistics.median(v[-args.reps :]), 2) for k, v in ratios.items()}, flush=True)
    summary = {
        str(k): {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)} for k, v in ratios.items()
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    for k, v in summary.items():
        print(
            f"k={k:>2}: refinement = {v['median']:.2f} x one plain forward pass "
            f"(range {v['min']:.2f}-{v['max']:.2f}, n={v['n']})"
        )


if __name__ == "__main__":
    main()
