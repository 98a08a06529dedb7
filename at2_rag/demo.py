"""The citation demo: a small RAG run on the embedded model, printed with citation marks and a ranked table."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from .prompting.sources import Document

DEMO_QUERY = "How long is the battery life of the Aurora X2 headphones?"

DEMO_CORPUS: list[Document] = [
    Document(
        id="aurora-x2-specs",
        title="Aurora X2 headphones: specifications",
        text=(
            "The Aurora X2 are over-ear wireless headphones with active noise cancellation. "
            "The battery lasts up to 38 hours with noise cancellation switched on. "
            "A ten-minute charge over USB-C gives about five hours of playback."
        ),
    ),
    Document(
        id="aurora-x1-specs",
        title="Aurora X1 headphones (previous model)",
        text=(
            "The Aurora X1 were the first headphones in the Aurora line, released in 2021. "
            "They used a micro-USB port and offered 22 hours of battery life. "
            "The X1 did not support multipoint Bluetooth."
        ),
    ),
    Document(
        id="returns-policy",
        title="Returns and warranty",
        text=(
            "Products can be returned within 30 days of delivery for a full refund. "
            "All headphones carry a two-year limited warranty covering manufacturing defects. "
            "Batteries are covered for one year."
        ),
    ),
    Document(
        id="shipping",
        title="Shipping times",
        text=(
            "Orders placed before 2 pm ship the same business day. "
            "Standard delivery takes three to five business days within the EU. "
            "Express delivery arrives the next business day."
        ),
    ),
    Document(
        id="nova-speaker",
        title="Nova portable speaker",
        text=(
            "The Nova is a waterproof portable speaker rated IP67. "
            "Its battery provides 14 hours of playback at medium volume. "
            "Two Nova speakers can be paired for stereo sound."
        ),
    ),
]

_WORD = re.compile(r"\w+")


def lexical_top_k(query: str, documents: list[Document], k: int) -> list[Document]:
    """A tiny term-overlap retriever so the demo needs nothing beyond the core install."""
    q = Counter(w.lower() for w in _WORD.findall(query) if len(w) > 2)
    scored = []
    for i, doc in enumerate(documents):
        words = Counter(w.lower() for w in _WORD.findall(doc.text + " " + (doc.title or "")))
        scored.append((sum(min(c, words[w]) for w, c in q.items()), -i, doc))
    return [d for _, _, d in sorted(scored, reverse=True)[:k]]


def run_demo(attributor: Any, query: str = DEMO_QUERY, k: int = 4, max_new_tokens: int = 64) -> Any:
    documents = lexical_top_k(query, DEMO_CORPUS, k)
    return attributor.generate(query, documents, max_new_tokens=max_new_tokens)
