"""Attribution in conversations on the embedded model: n multi-turn held-out examples, the same evaluation as
`at2-rag evaluate EXAMPLES --conversations` (see at2_rag/evaluation/conversations.py). Resumable: rows are
appended to docs/bench/conversations.jsonl per example; the summary goes to docs/bench/conversations.json.

    python bench/conversations.py --examples 40
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from at2_rag import Attributor, load_default_model
from at2_rag.evaluation.conversations import evaluate_conversations
from at2_rag.training.data import read_examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heldout", default="data/rag_python_docs/heldout.jsonl")
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--out", default="docs/bench/conversations")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="for the first answer and the follow-up's")
    parser.add_argument("--estimator", help="estimator folder (default: the shipped one)")
    args = parser.parse_args()
    model, tokenizer = load_default_model()
    attributor = Attributor(model, tokenizer, estimator=args.estimator)
    out = Path(args.out)
    summary = evaluate_conversations(
        attributor, read_examples(args.heldout), out.with_suffix(".jsonl"), args.max_new_tokens, limit=args.examples
    )
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
