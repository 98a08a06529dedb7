"""Multi-turn training/held-out examples for collection: the model's own first answer as history, then a
follow-up (repeat / build on / doubt / unanswerable; at2_rag/evaluation/conversations.py). Resumable JSONL.

    python scripts/build_conversations.py data/rag_python_docs/train.jsonl \
        data/rag_python_docs/train_conversations.jsonl --examples 120
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm.auto import tqdm

from at2_rag import Attributor, load_default_model
from at2_rag.evaluation.conversations import KINDS, conversation_example
from at2_rag.examples import read_examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("output")
    parser.add_argument("--examples", type=int, default=120)
    parser.add_argument("--offset", type=int, default=0, help="skip this many examples of the source first")
    args = parser.parse_args()
    examples = read_examples(args.source)[args.offset : args.offset + args.examples]
    out = Path(args.output)
    done = {json.loads(line)["id"] for line in out.read_text().splitlines()} if out.exists() else set()
    model, tokenizer = load_default_model()
    attributor = Attributor(model, tokenizer)
    with out.open("a") as handle:
        for i in tqdm(range(len(examples)), desc="conversations", unit="ex"):
            if f"{examples[i].id}-{KINDS[i % len(KINDS)]}" in done:
                continue
            conversation = conversation_example(attributor, examples, i)
            documents = [
                d if isinstance(d, dict) else d.model_dump(exclude_none=True) for d in conversation["documents"]
            ]
            handle.write(json.dumps({**conversation, "documents": documents}) + "\n")
            handle.flush()


if __name__ == "__main__":
    main()
