"""Scoring: captured features -> estimator scores -> citations, groundedness and the Attribution result.

The citation policy (how many documents a sentence cites, relative to its best one, and the support threshold)
lives here, beside the code that applies it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..capture.captured import Captured
from ..capture.features import target_features
from ..capture.masked import target_log_odds
from ..evidence.bundle import Evidence
from ..evidence.groundedness import GroundednessEvidence, GroundednessMode
from ..evidence.layout import history_columns, refinement_units
from ..prompting.answer import answer_targets
from ..prompting.render import RenderedPrompt
from ..prompting.sources import CharSpan
from .estimator import ScoreEstimator
from .grounding import GroundednessCalibration
from .refine import RefinementPrior, refine_scores
from .result import Attribution, Citation, CitedDocument, ContextSource, DocumentScore, SentenceScore

#: a sentence cites at most this many documents ...
MAX_CITED_PER_SENTENCE = 3
#: ... each scoring at least this share of the sentence's best document ...
RELATIVE_CITATION_CUTOFF = 0.5
#: ... and at least this score (unless the estimator's metadata sets `support_threshold`)
DEFAULT_SUPPORT_THRESHOLD = 0.05

@dataclasses.dataclass(frozen=True)
class _Columns:
    """The feature columns of a run: documents, then their sentences, then the context parts."""

    docs: int
    sents: int

    def documents(self, scores: list[float]) -> list[float]:
        return scores[: self.docs]

    def sentences(self, scores: list[float]) -> list[float]:
        return scores[self.docs : self.docs + self.sents]

    def context(self, scores: list[float]) -> list[float]:
        return scores[self.docs + self.sents :]


def _context_sources(prompt: RenderedPrompt, scores: list[float]) -> list[ContextSource]:
    return [
        ContextSource(kind=p.kind, index=p.index, role=p.role, text=p.text, score=score)
        for p, score in zip(prompt.context_parts, scores)
    ]


def _sentences_by_doc(prompt: RenderedPrompt) -> dict[int, list[tuple[int, Any]]]:
    """Each document's sentence sources with their column among the sentence scores."""
    grouped: dict[int, list[tuple[int, Any]]] = {}
    for j, src in enumerate(prompt.sentence_sources):
        grouped.setdefault(src.doc_index, []).append((j, src))
    return grouped


class Scorer:
    """Turns a Captured into an Attribution with one estimator and one citation policy."""

    def __init__(
        self,
        estimator: ScoreEstimator,
        support_threshold: float | None = None,
        grounded_threshold: float | None = None,
    ) -> None:
        self.estimator = estimator
        if support_threshold is None:
            support_threshold = float(estimator.metadata.get("support_threshold", DEFAULT_SUPPORT_THRESHOLD))
        self.support_threshold = support_threshold
        # nats: a sentence is supported when removing every document is predicted to lower its log-odds this much
        self.grounded_threshold = grounded_threshold
        self.refinement = RefinementPrior.from_metadata(estimator.metadata)
        self._calibration = GroundednessCalibration.from_metadata(
            estimator.metadata, fallback_scale=self.refinement.scale, num_features=estimator.weights.numel()
        )

    @torch.no_grad()
    def attribution(
        self, run: Captured, groundedness: GroundednessMode = "estimated", evidence: Evidence | None = None
    ) -> Attribution:
        """Scores, citations and groundedness of a run: documents, their sentences and the context parts
        (earlier turns, system prompt, question) scored by the same estimator. With ablation evidence
        (`evidence.ablations`, k passes over the documents and earlier turns, `refinement_units`) the scores of the
        whole answer and of each answer sentence are refined, with the AT2 scores as the prior (`_refined`).

        `groundedness="measured"` takes each sentence's `grounded` from `evidence.groundedness` (the measured drop
        when every document is removed, and `context_grounded` when every earlier turn is); "estimated" from the
        estimator's calibration (or the refined surrogate); "off" computes none (every sentence counts as
        supported)."""
        measured = evidence.groundedness if evidence is not None else None
        ablated = evidence.ablations if evidence is not None else None
        if groundedness == "measured" and (measured is None or measured.documents_removed is None):
            raise ValueError('groundedness="measured" needs the measured evidence (`GroundednessEvidence`)')
        prompt, answer = run.prompt, run.answer
        columns = _Columns(len(prompt.doc_sources), len(prompt.sentence_sources))
        rows_all = [i for i, (a, b) in enumerate(answer.char_spans) if b > a] or list(range(len(answer.token_ids)))
        targets = answer_targets(answer)
        target_rows = [rows_all] + [rows for _, rows in targets]
        features = [target_features(run.token_features, rows) for rows in target_rows]
        scores = [self.estimator(f).tolist() for f in features]
        _, units = refinement_units(prompt)
        refined = ablated is not None
        if ablated is not None:
            if ablated.masks.shape[1] != len(units) or ablated.logit_probs.shape[1] != len(answer.token_ids):
                raise ValueError("the ablation evidence was measured on another run")
            scores = [
                self._refined(s, ablated.masks, target_log_odds(ablated.logit_probs, rows), units, prompt)
                for rows, s in zip(target_rows, scores)
            ]
        whole, per_sentence = scores[0], scores[1:]
        grounding = self.groundedness(refined=refined)
        measure = _GroundednessSource(groundedness, measured)

        sentences_by_doc = _sentences_by_doc(prompt)
        doc_scores, sent_scores = columns.documents(whole), columns.sentences(whole)
        documents = []
        for i, doc in enumerate(prompt.documents):
            a, b = prompt.doc_token_spans[i]
            documents.append(
                DocumentScore(
                    index=i,
                    id=doc.id,
                    title=doc.title,
                    url=doc.url,
                    text=doc.text,
                    metadata=doc.metadata,
                    score=doc_scores[i],
                    num_tokens=b - a,
                    sentences=[
                        SentenceScore(text=s.text, start=s.span.start, end=s.span.end, score=sent_scores[j])
                        for j, s in sentences_by_doc.get(i, [])
                    ],
                )
            )

        citations = [
            self._citation(answer.text, span, target, f, prompt, columns, sentences_by_doc, grounding, measure, rows)
            for (span, rows), target, f in zip(targets, per_sentence, features[1:])
        ]
        if citations:
            supported = any(c.supported for c in citations)
        elif groundedness == "off":
            supported = True
        else:
            grounded = measure.documents(rows_all)
            if grounded is None:
                grounded = self._grounded(grounding, whole, features[0], prompt) if columns.docs else float("-inf")
            supported = bool(grounded >= grounding.threshold)
        return Attribution(
            query=run.query,
            answer=answer.text,
            prompt=prompt.text,
            documents=documents,
            citations=citations,
            estimator=repr(self.estimator),
            estimator_trained=self.estimator.trained,
            support_threshold=self.support_threshold,
            supported=supported,
            grounded_threshold=grounding.threshold,
            num_prompt_tokens=prompt.num_tokens,
            num_answer_tokens=len(answer.token_ids),
            finish_reason=run.finish_reason,
            unlocated_documents=list(prompt.unlocated_documents),
            context_sources=_context_sources(prompt, columns.context(whole)),
            extra_forward_passes=evidence.passes if evidence is not None else 0,
            groundedness=groundedness,
        )

    @torch.no_grad()
    def citation_for(
        self,
        run: Captured,
        sentence_index: int,
        groundedness: GroundednessMode = "estimated",
        evidence: GroundednessEvidence | None = None,
    ) -> Citation:
        """The AT2 citation of one answer sentence (the `sentence_index`-th of `features.answer_targets`) with the
        same estimator, citation policy and groundedness as `attribution` (no refinement); `evidence` must cover
        the sentence's tokens when measured.

        `run` may be a partial run of a generation in progress (`LiveGeneration.captured()`): attention is causal,
        so once a sentence's last token is generated its features, and this citation, equal those of the finished
        run, as long as the splitter still cuts the answer there."""
        targets = answer_targets(run.answer)
        if not 0 <= sentence_index < len(targets):
            raise IndexError(f"sentence {sentence_index} of an answer with {len(targets)} sentences")
        prompt = run.prompt
        span, rows = targets[sentence_index]
        columns = _Columns(len(prompt.doc_sources), len(prompt.sentence_sources))
        features = target_features(run.token_features, rows)
        scores = self.estimator(features).tolist()
        sentences_by_doc = _sentences_by_doc(prompt)
        grounding = self.groundedness(refined=False)
        measure = _GroundednessSource(groundedness, evidence)
        return self._citation(
            run.answer.text, span, scores, features, prompt, columns, sentences_by_doc, grounding, measure, rows
        )

    def groundedness(self, refined: bool) -> GroundednessCalibration:
        """Refined scores are the ablation surrogate's effects (in prior units): the sum of the documents' in
        nats is the surrogate's own prediction of removing them all, with the earlier turns' effects fitted
        apart (they were ablated too), so no history term and no head; AT2 runs use the estimator's calibration
        (its learned head when it has one)."""
        calibration = self._calibration
        if self.grounded_threshold is not None:
            calibration = dataclasses.replace(calibration, threshold=float(self.grounded_threshold))
        if refined:
            return dataclasses.replace(
                calibration,
                scale=self.refinement.scale,
                offset=0.0,
                history_scale=0.0,
                calibrated=True,
                document_weights=None,
                history_weights=None,
            )
        return calibration

    @staticmethod
    def _grounded(
        grounding: GroundednessCalibration, scores: list[float], features: torch.Tensor, prompt: RenderedPrompt
    ) -> float:
        """One target's groundedness (nats) from its scores and features `[columns, L*H]`."""
        n_docs, turns = len(prompt.doc_sources), history_columns(prompt)
        return grounding.grounded(
            scores[:n_docs], [scores[c] for c in turns], features[:n_docs].sum(0), features[turns].sum(0)
        )

    def _refined(
        self, scores: list[float], masks: torch.Tensor, labels: torch.Tensor, units: list[int], prompt: RenderedPrompt
    ) -> list[float]:
        """One target's scores after the passes: the ablated units (documents, earlier turns) refined on their
        masks, and the document sentences refined in the same model, each sentence's column carrying its
        document's keep bit (the passes cannot tell a document's sentences apart, so the prior splits what they
        share); the system prompt and question keep their AT2 scores."""
        n_docs = len(prompt.doc_sources)
        out = list(scores)
        prior = torch.tensor([scores[c] for c in units])
        for c, value in zip(units, refine_scores(prior, masks, labels, self.refinement).tolist()):
            out[c] = value
        if prompt.sentence_sources:
            sentence_columns = [n_docs + j for j in range(len(prompt.sentence_sources))]
            doc_of = torch.tensor([src.doc_index for src in prompt.sentence_sources])
            expanded = torch.cat([masks[:, doc_of], masks[:, n_docs:]], dim=1)
            joint = torch.tensor([scores[c] for c in sentence_columns + units[n_docs:]])
            refined = refine_scores(joint, expanded, labels, self.refinement).tolist()
            for c, value in zip(sentence_columns, refined):
                out[c] = value
        return out

    def _citation(
        self,
        answer_text: str,
        span: CharSpan,
        scores: list[float],
        features: torch.Tensor,
        prompt: RenderedPrompt,
        columns: _Columns,
        sentences_by_doc: dict[int, list[tuple[int, Any]]],
        grounding: GroundednessCalibration,
        measure: _GroundednessSource,
        rows: list[int],
    ) -> Citation:
        doc_scores, sent_scores = columns.documents(scores), columns.sentences(scores)
        ranked = sorted(range(columns.docs), key=lambda i: doc_scores[i], reverse=True)
        cited_docs = []
        for i in ranked:
            doc = prompt.documents[i]
            sents = sorted(
                (
                    SentenceScore(text=s.text, start=s.span.start, end=s.span.end, score=sent_scores[j])
                    for j, s in sentences_by_doc.get(i, [])
                ),
                key=lambda s: s.score,
                reverse=True,
            )[:3]
            cited_docs.append(CitedDocument(index=i, id=doc.id, title=doc.title, score=doc_scores[i], sentences=sents))
        context_scores = columns.context(scores)
        grounded: float | None
        if measure.mode == "off":
            grounded, supported = None, True
        else:
            grounded = measure.documents(rows)
            if grounded is None:
                grounded = self._grounded(grounding, scores, features, prompt)
            supported = bool(grounded >= grounding.threshold)
        best = doc_scores[ranked[0]] if ranked else 0.0
        cited = [
            d.id
            for d in cited_docs[:MAX_CITED_PER_SENTENCE]
            if supported and d.score >= self.support_threshold and d.score >= RELATIVE_CITATION_CUTOFF * best
        ]
        # the earlier turns and system prompt it draws on (the question is part of every answer: not listed)
        context = sorted(
            (c for c in _context_sources(prompt, context_scores) if c.kind != "query"),
            key=lambda c: c.score,
            reverse=True,
        )
        listed = [c for c in context if c.score >= self.support_threshold]
        context_grounded = measure.turns(rows)
        if context_grounded is not None:
            # measured: the earlier turns are listed exactly when removing them all lowers the sentence by the
            # threshold (then at least the best-scored turn), whatever their scores say
            turns = [c for c in context if c.kind == "history"]
            drawn = context_grounded >= grounding.threshold
            listed = [c for c in listed if c.kind != "history" or drawn]
            if drawn and turns and not any(c.kind == "history" for c in listed):
                listed = sorted(listed + turns[:1], key=lambda c: c.score, reverse=True)
        return Citation(
            text=answer_text[span.start : span.end],
            start=span.start,
            end=span.end,
            documents=cited_docs,
            cited=cited,
            supported=supported,
            grounded=grounded,
            context=listed[:MAX_CITED_PER_SENTENCE],
            context_grounded=context_grounded,
        )


@dataclasses.dataclass(frozen=True)
class _GroundednessSource:
    """Where a target's measured drops come from: the evidence in measured mode, nothing otherwise (None: the
    estimate applies)."""

    mode: GroundednessMode
    evidence: GroundednessEvidence | None

    def documents(self, rows: list[int]) -> float | None:
        if self.mode != "measured" or self.evidence is None:
            return None
        return self.evidence.documents_drop(rows)

    def turns(self, rows: list[int]) -> float | None:
        if self.mode != "measured" or self.evidence is None:
            return None
        return self.evidence.turns_drop(rows)
