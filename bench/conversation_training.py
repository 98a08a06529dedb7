"""Does training on conversations help? An estimator trained on the single-turn training split plus the
multi-turn shards (`collect --sources context`), against the shipped one, on the single-turn held-out split
(LDS over the collected masks) and the multi-turn held-out evaluation (bench/conversations.py --estimator).

    python bench/conversation_training.py --out runs/estimator-conversations
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from at2_rag.estimator import ScoreEstimator
from at2_rag.evaluation.metrics import lds
from at2_rag.training.data import load_collected
from at2_rag.training.train import split_examples, train_estimator

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def heldout_lds(examples, weights) -> tuple[float, float]:
    values = []
    for ex in examples:
        for t in range(ex.features.shape[0]):
            if ex.labels[t].std() > 1e-4:
                value = lds((ex.features[t] @ weights).float(), ex.masks, ex.labels[t].float())
                if not math.isnan(value):
                    values.append(value)
    v = torch.tensor(values, dtype=torch.double)
    return float(v.mean()), float(v.std() / math.sqrt(len(v)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", default="data/collected/smollm2-train")
    parser.add_argument("--conversations", default="data/collected/smollm2-conversations")
    parser.add_argument("--out", default="runs/estimator-conversations")
    args = parser.parse_args()
    train_single, held_single = split_examples(load_collected(args.single), 0.15, 0)
    multi = load_collected(args.conversations)
    estimator, report = train_estimator(
        train_single + multi, 30, 9, model_id=MODEL, epochs=300, patience=30, progress=False
    )
    estimator.metadata["training_data"] = (
        f"{len(train_single)} single-turn examples (the shipped estimator's training split) + {len(multi)} multi-turn "
        "examples (scripts/build_conversations.py, collect --sources context)"
    )
    estimator.save_pretrained(args.out)
    shipped = ScoreEstimator.shipped(MODEL)
    result = {
        "single_turn_heldout_lds_shipped": heldout_lds(held_single, shipped.weights.detach()),
        "single_turn_heldout_lds_mixed": heldout_lds(held_single, estimator.weights.detach()),
        "mixed_training_report": {k: v for k, v in report.items() if k != "history"},
    }
    Path(args.out, "comparison.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
