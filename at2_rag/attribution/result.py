"""Public results: per-document, per-sentence and per-answer-sentence scores, with notebook, terminal and plot views.

Scores are unitless estimates of how much the answer depends on each source; compare them within one answer.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..prompting.sources import UnlocatedDocument, context_key

ATTRIBUTION_SCHEMA = "at2-rag/attribution"
ATTRIBUTION_SCHEMA_VERSION = 3  # 2: context sources, grounded, extra_forward_passes; 3: groundedness mode


class SentenceScore(BaseModel):
    """A sentence inside a document: char span relative to the document text."""

    text: str
    start: int
    end: int
    score: float


class DocumentScore(BaseModel):
    """One document's attribution for the whole answer, with its sentences scored too."""

    index: int
    id: str
    title: str | None = None
    url: str | None = None
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    score: float
    sentences: list[SentenceScore] = Field(default_factory=list)
    num_tokens: int = 0

    def top_sentences(self, k: int = 3) -> list[SentenceScore]:
        return sorted(self.sentences, key=lambda s: s.score, reverse=True)[:k]


class CitedDocument(BaseModel):
    """A document's support for one answer sentence, with its best-supporting sentences (char spans)."""

    index: int
    id: str
    title: str | None = None
    score: float
    sentences: list[SentenceScore] = Field(default_factory=list)


class ContextSource(BaseModel):
    """A part of the prompt other than the documents, scored by the same estimator on the same scale: an
    earlier turn (`kind="history"`, `index` = its position in the history), the system prompt, the question."""

    kind: str = Field(description='"history" | "system" | "query"')
    index: int | None = None
    role: str
    text: str
    score: float

    @property
    def key(self) -> str:
        """`history:0`, `system`, `query`: the keys of `Attribution.context_scores()`."""
        return context_key(self.kind, self.index)


class Citation(BaseModel):
    """One answer sentence (char span in the answer) and the documents that support it, best first."""

    text: str
    start: int
    end: int
    documents: list[CitedDocument]
    cited: list[str] = Field(
        default_factory=list, description="ids of documents marked as supporting (none when not `supported`)"
    )
    supported: bool = Field(
        default=True, description="`grounded` reaches the threshold (1 nat by default); True when groundedness is off"
    )
    grounded: float | None = Field(
        default=0.0,
        description="how much this sentence depends on the documents: the drop, in nats, of its log-odds when every "
        "document is removed from attention. groundedness='measured' (the default): measured exactly with one "
        "teacher-forced pass; 'estimated': predicted by the estimator at zero cost (less reliable on documents "
        "unlike its training data); None with 'off'. Dependence, not truth: a wrong sentence can depend on a "
        "document that says something else",
    )
    context: list[ContextSource] = Field(
        default_factory=list,
        description="earlier turns and the system prompt this sentence draws on (e.g. the answer it repeats), "
        "best first. Measured groundedness lists the earlier turns exactly when `context_grounded` reaches the "
        "threshold",
    )
    context_grounded: float | None = Field(
        default=None,
        description="in a conversation with measured groundedness: the drop, in nats, of this sentence's log-odds "
        "when every earlier turn is removed from attention (None otherwise)",
    )


class Attribution(BaseModel):
    """What the answer used. `document_scores()` for the whole answer, `citations` per answer sentence."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    query: str
    answer: str
    prompt: str
    documents: list[DocumentScore]
    citations: list[Citation]
    estimator: str
    estimator_trained: bool
    support_threshold: float
    supported: bool
    grounded_threshold: float = Field(
        default=1.0, description="nats: a sentence is supported when its `grounded` reaches this"
    )
    num_prompt_tokens: int
    num_answer_tokens: int
    finish_reason: str | None = None
    unlocated_documents: list[UnlocatedDocument] = Field(
        default_factory=list,
        description="documents given but not found in an already-rendered prompt: not scored, listed with the reason",
    )
    context_sources: list[ContextSource] = Field(
        default_factory=list,
        description="earlier turns, the system prompt and the question, scored like documents for the whole answer",
    )
    extra_forward_passes: int = Field(
        default=0,
        description="passes paid beyond the generation (or the one forward pass over a given answer): measured "
        "groundedness (every document removed; every earlier turn removed) and ablations",
    )
    groundedness: str = Field(
        default="estimated", description='how `grounded` was obtained: "measured", "estimated" or "off"'
    )

    # ---- accessors -------------------------------------------------------------------------------------
    def document_scores(self) -> dict[str, float]:
        return {d.id: d.score for d in self.documents}

    def top_documents(self, k: int = 3) -> list[DocumentScore]:
        return sorted(self.documents, key=lambda d: d.score, reverse=True)[:k]

    def document(self, doc_id: str) -> DocumentScore:
        for d in self.documents:
            if d.id == doc_id:
                return d
        raise KeyError(f"no document with id {doc_id!r}; ids are {[d.id for d in self.documents]}")

    def context_scores(self) -> dict[str, float]:
        """`{"history:0": s, ..., "system": s, "query": s}`: the context sources' scores for the whole answer."""
        return {c.key: c.score for c in self.context_sources}

    def sentence_scores(self) -> list[tuple[str, SentenceScore]]:
        """Every document sentence with its score, highest first."""
        pairs = [(d.id, s) for d in self.documents for s in d.sentences]
        return sorted(pairs, key=lambda p: p[1].score, reverse=True)

    def cited_answer(self) -> str:
        """The answer with [n] marks (1-based document numbers) after each cited sentence."""
        out, last = [], 0
        for c in self.citations:
            out.append(self.answer[last : c.end])
            marks = "".join(f"[{self.document(i).index + 1}]" for i in c.cited)
            out.append(marks if marks else "")
            last = c.end
        out.append(self.answer[last:])
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: every field (documents, citations with `grounded` and `context`, context
        sources, `extra_forward_passes`), tagged with the schema name and version for readers elsewhere."""
        return {
            "schema": ATTRIBUTION_SCHEMA,
            "schema_version": ATTRIBUTION_SCHEMA_VERSION,
            **self.model_dump(mode="json"),
        }

    def to_json(self, **kwargs: Any) -> str:
        return self.model_dump_json(**kwargs)

    # ---- views -------------------------------------------------------------------------------------------
    def _repr_html_(self) -> str:
        best = max((d.score for d in self.documents), default=0.0) or 1.0
        parts = ['<div class="at2-attribution" style="font-family:sans-serif;line-height:1.5">']
        if not self.supported:
            parts.append('<p style="color:#b00"><b>No document clearly supports this answer.</b></p>')
        answer_html, last = [], 0
        for c in self.citations:
            answer_html.append(html.escape(self.answer[last : c.end]))
            for doc_id in c.cited:
                d = self.document(doc_id)
                answer_html.append(f'<sup title="{html.escape(d.title or d.id)}">[{d.index + 1}]</sup>')
            last = c.end
        answer_html.append(html.escape(self.answer[last:]))
        parts.append(f"<p><b>Q:</b> {html.escape(self.query)}</p><p><b>A:</b> {''.join(answer_html)}</p>")
        parts.append("<ol>")
        for d in self.documents:
            alpha = max(0.0, d.score) / best
            label = html.escape(d.title or d.id)
            body = _highlight_sentences(d)
            parts.append(
                f'<li style="background:rgba(255,165,0,{alpha * 0.5:.2f});margin:4px 0;padding:4px">'
                f"<b>{label}</b> <code>{d.score:.3f}</code><br><small>{body}</small></li>"
            )
        parts.append("</ol>")
        if self.unlocated_documents:
            missing = ", ".join(html.escape(f"{u.title or u.id} ({u.reason})") for u in self.unlocated_documents)
            parts.append(f"<p><i>Not found in the prompt, so not scored:</i> {missing}</p>")
        if not self.estimator_trained:
            parts.append("<p><i>Scores come from an untrained estimator (average attention).</i></p>")
        parts.append("</div>")
        return "".join(parts)

    def to_text(self, width: int = 100) -> str:
        """A plain-text view: the cited answer and a ranked table of documents."""
        lines = [f"Q: {self.query}", f"A: {self.cited_answer()}"]
        if not self.supported:
            lines.append("(no document clearly supports this answer)")
        lines.append("")
        lines.append(f"{'rank':>4}  {'score':>8}  {'doc':<4} title")
        for rank, d in enumerate(self.top_documents(len(self.documents)), 1):
            title = (d.title or d.id or "")[: max(10, width - 24)]
            lines.append(f"{rank:>4}  {d.score:>8.4f}  [{d.index + 1}]  {title}")
        for u in self.unlocated_documents:
            lines.append(f"{'-':>4}  {'-':>8}  {'-':<4} {u.title or u.id} (not in the prompt: {u.reason})")
        return "\n".join(lines)

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title="Documents ranked by attribution")
        table.add_column("rank", justify="right")
        table.add_column("score", justify="right")
        table.add_column("doc")
        table.add_column("title / top sentence")
        for rank, d in enumerate(self.top_documents(len(self.documents)), 1):
            top = d.top_sentences(1)
            table.add_row(
                str(rank),
                f"{d.score:.4f}",
                f"[{d.index + 1}]",
                f"{d.title or d.id}\n[dim]{top[0].text[:90] if top else ''}[/dim]",
            )
        header = Text.assemble(("Q: ", "bold"), self.query, "\n", ("A: ", "bold"), self.cited_answer())
        items: list[Any] = [header]
        if not self.supported:
            items.append(Text("No document clearly supports this answer.", style="bold red"))
        items.append(table)
        return Group(*items)

    def __str__(self) -> str:
        return self.to_text()

    def plot(self, path: str | Path) -> Path:
        """Save a heatmap of answer sentences x documents (scores) to `path` (PNG, SVG or PDF)."""
        import numpy as np

        from ..plotting import pyplot, save_figure

        plt = pyplot()

        rows = self.citations or []
        ids = [d.id for d in self.documents]
        grid = np.zeros((max(1, len(rows)), len(ids)))
        for r, c in enumerate(rows):
            for cd in c.documents:
                grid[r, ids.index(cd.id)] = cd.score
        labels = [(_short(c.text, 48)) for c in rows] or ["(answer)"]
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(ids), 1.0 + 0.45 * len(labels)))
        im = ax.imshow(grid, cmap="Oranges", aspect="auto")
        ax.set_xticks(
            range(len(ids)),
            [f"[{i + 1}] {_short(self.documents[i].title or d, 18)}" for i, d in enumerate(ids)],
            rotation=35,
            ha="right",
            fontsize=8,
        )
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_title("AT2 attribution: answer sentences x documents", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.04)
        return save_figure(fig, path)


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _highlight_sentences(doc: DocumentScore) -> str:
    best = max((s.score for s in doc.sentences), default=0.0) or 1.0
    out, last = [], 0
    for s in doc.sentences:
        out.append(html.escape(doc.text[last : s.start]))
        alpha = max(0.0, s.score) / best * 0.6
        out.append(
            f'<mark style="background:rgba(255,200,0,{alpha:.2f})">{html.escape(doc.text[s.start : s.end])}</mark>'
        )
        last = s.end
    out.append(html.escape(doc.text[last:]))
    return "".join(out)
