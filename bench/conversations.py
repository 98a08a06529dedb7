"""Attribution in conversations on the embedded model: n multi-turn held-out examples (see
at2_rag/evaluation/conversations.py). Resumable: rows are appended to docs/bench/conversations.jsonl per
example; the summary goes to docs/bench/conversations.json.

    python bench/conversations.py --examples 40
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm.auto import tqdm

from at2_rag import Attributor, load_default_model
from at2_rag.evaluation.conversations import conversation_example, evaluate_conversation, summarize_conversations
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
    rows_path = Path(args.out).with_suffix(".jsonl")
    done = {json.loads(line)["example"] for line in rows_path.read_text().splitlines()} if rows_path.exists() else set()
    examples = read_examples(args.heldout)[: args.examples]
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    with rows_path.open("a") as out:
        for i in tqdm([i for i, e in enumerate(examples) if e.id not in done], desc="conversations", unit="ex"):
            conversation = conversation_example(attributor, examples, i, first_turn_tokens=args.max_new_tokens)
            rows = evaluate_conversation(attributor, conversation, max_new_tokens=args.max_new_tokens)
            out.write(json.dumps({"example": examples[i].id, "rows": rows}) + "\n")
            out.flush()
    rows = [r for line in rows_path.read_text().splitlines() for r in json.loads(line)["rows"]]
    summary = summarize_conversations(rows)
    Path(args.out).with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
