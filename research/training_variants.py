"""Which training data makes a better estimator? Variants trained on the shipped estimator's training split
(510 examples of `data/collected/smollm2-train`, document-level ablations), compared on its held-out split
(90 examples, LDS over each target's 32 collected masks, standard errors over targets):

- all 510 training examples, against the same minus the examples whose answers degenerate (the 48-token limit
  reached while repeating itself: at least 20 % of the answer's word trigrams are repeats);
- learning curve: random subsets of 64, 128 and 256 examples;
- with `--sentences DIR` (shards of `collect --sources sentences` on training-split examples): the estimator
  trained on sentence-level ablations (each sentence of every document its own source, 32 masks) against one
  trained on the document-level ablations of the same examples, and document-level + sentence-level mixed;
- with `--tokens DIR` (`collect --sources tokens`: every document token its own source, as the reference AT2
  trains), the same three comparisons at token level;
- with `--answers DIR` (`collect --targets answer`: the whole answer as the one target, document-level sources),
  the same three comparisons for whole-answer targets against per-sentence ones.

Each variant is trained with two seeds (the seed draws the early-stopping split and the subset). Held-out LDS is
reported over all targets and over the targets of non-degenerate answers. Writes docs/bench/training_variants.json.

    python -m research.training_variants [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from at2_rag.attribution.estimator import ScoreEstimator
from at2_rag.evaluation.metrics import lds
from at2_rag.training.data import load_collected
from at2_rag.training.train import split_examples, train_estimator

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
REPEATED_TRIGRAMS = 0.2


def repeated_share(answer: str) -> float:
    """The share of the answer's word trigrams that repeat an earlier one."""
    words = answer.split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def degenerate(example) -> bool:
    meta = example.meta
    return meta.get("finish_reason") == "length" and repeated_share(meta.get("answer", "")) >= REPEATED_TRIGRAMS


def heldout_lds(examples, weights) -> tuple[float, float, int]:
    values = []
    for ex in examples:
        for t in range(ex.features.shape[0]):
            if ex.labels[t].std() > 1e-4:
                value = lds((ex.features[t] @ weights).float(), ex.masks[:32], ex.labels[t][:32].float())
                if not math.isnan(value):
                    values.append(value)
    v = torch.tensor(values, dtype=torch.double)
    return float(v.mean()), float(v.std() / math.sqrt(len(v))), len(v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collected", default="data/collected/smollm2-train")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sentences", help="shards collected with --sources sentences (training-split examples)")
    parser.add_argument("--tokens", help="shards collected with --sources tokens (training-split examples)")
    parser.add_argument("--answers", help="shards collected with --targets answer (training-split examples)")
    parser.add_argument("--out", default="docs/bench/training_variants.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, held = split_examples(load_collected(args.collected), 0.15, 0)
    clean_held = [ex for ex in held if not degenerate(ex)]
    print(f"{len(train)} training / {len(held)} held-out examples; degenerate: "
          f"{sum(map(degenerate, train))} / {sum(map(degenerate, held))}", flush=True)

    def evaluate(weights) -> dict:
        return {"all": heldout_lds(held, weights), "non_degenerate": heldout_lds(clean_held, weights)}

    variants: dict[str, list] = {
        "all": [lambda seed: train] * 1,
        "degenerate dropped": [lambda seed: [ex for ex in train if not degenerate(ex)]],
        **{f"{n} examples": [lambda seed, n=n: random.Random(seed).sample(train, n)] for n in (64, 128, 256)},
    }
    finer = {"sentence-level": args.sentences, "token-level": args.tokens, "whole-answer": args.answers}
    if any(finer.values()):
        variants = {}
    held_ids = {ex.id for ex in held}
    for level, folder in finer.items():
        if not folder:
            continue
        shards = load_collected(folder)
        if any(ex.id in held_ids for ex in shards):
            raise SystemExit(f"the {level} shards hold held-out examples: collect training-split ones only")
        ids = {ex.id for ex in shards}
        same_documents = [ex for ex in train if ex.id in ids]
        print(f"{level}: {len(shards)} examples ({len(same_documents)} with document-level data)")
        variants.update(
            {
                f"{level}, {len(shards)} examples": [lambda seed, shards=shards: shards],
                f"document-level, the same {len(same_documents)} examples": [lambda seed, same=same_documents: same],
                f"document-level 510 + {level} {len(shards)}": [lambda seed, shards=shards: train + shards],
            }
        )
    rows = {"shipped": evaluate(ScoreEstimator.shipped(MODEL).weights.detach()),
            "average attention": evaluate(torch.full((270,), 1 / 270))}
    for name, (pick,) in variants.items():
        runs = []
        for seed in args.seeds:
            t = time.perf_counter()
            chosen = pick(seed)
            estimator, report = train_estimator(chosen, 30, 9, model_id=MODEL, epochs=300, patience=30, seed=seed,
                                                progress=False)
            result = evaluate(estimator.weights.detach())
            runs.append({"seed": seed, "examples": len(chosen), "best_epoch": report.get("best_epoch"),
                         "seconds": time.perf_counter() - t, **result})
            print(f"{name} seed {seed}: {len(chosen)} examples, held-out LDS {result['all'][0]:.3f}"
                  f"±{result['all'][1]:.3f} (non-degenerate {result['non_degenerate'][0]:.3f})", flush=True)
        rows[name] = runs
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {}
    record.update({"train_examples": len(train), "heldout_examples": len(held), "repeated_trigrams": REPEATED_TRIGRAMS})
    record.setdefault("results", {}).update(rows)  # a --sentences / --tokens run adds its rows to the earlier ones
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
