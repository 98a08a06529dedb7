"""The Attributor: at2-rag's front door, over three public stages with typed hand-offs.

    prepare(request | messages) -> Prepared        the prompt rendered (or located), every check run once
    run(Prepared | list[Prepared]) -> Captured      generation or one forward pass, with attention capture
    measure_groundedness(Captured), ablate(Captured, k)   optional measured evidence (extra passes)
    score(Captured, evidence) -> Attribution        features -> estimator -> citations

`generate`, `stream` and `attribute` (and their batch forms) are each one call over those stages.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast, overload

import torch

from .attribution.estimator import ScoreEstimator
from .attribution.result import Attribution, Citation
from .attribution.scoring import Scorer
from .capture._runner import LiveGeneration, ModelRunner
from .capture.attention import paused_capture
from .capture.captured import Captured
from .capture.hooks import RunHooks
from .errors import DocumentsNotLocatedError, InvalidInputError
from .evidence.ablations import AblationEvidence, check_ablations, gather_ablations
from .evidence.bundle import Evidence
from .evidence.groundedness import GroundednessEvidence, GroundednessMode, MeasuredGroundedness, check_groundedness
from .prompting.answer import answer_targets, encode_with_offsets
from .prompting.locate import LocatedPrompt, locate_prompt
from .prompting.prepared import Prepared, check_answer, check_max_new_tokens
from .prompting.render import PromptTemplate, RenderedPrompt, render_messages_with_ranges, render_prompt
from .prompting.request import TEMPLATE_DEFAULT, AttributionRequest, SystemPrompt
from .prompting.sources import DocumentLike, normalize_documents

logger = logging.getLogger(__name__)

RequestLike = AttributionRequest | Mapping[str, Any]

_WORD_END = re.compile(r"\S\s")  # a word followed by whitespace


class _SentenceTracker:
    """`stream(sentence_citations=True)`'s `on_step`: in the generation thread, between decode steps, the citation of
    every answer sentence that became complete with the newest token (see `Attributor.stream`)."""

    def __init__(self, scorer: Scorer, groundedness: GroundednessMode, meter: MeasuredGroundedness | None) -> None:
        self.scorer = scorer
        self.groundedness = groundedness
        self.meter = meter  # measured groundedness, fed each completed sentence's tokens
        self.done = 0  # sentences whose citation was handed out
        self.checked = 0  # answer characters already looked at for a word end

    def __call__(self, live: LiveGeneration) -> list[Citation]:
        answer = live.answer
        new = answer.text[max(0, self.checked - 1) :]
        self.checked = len(answer.text)
        if not _WORD_END.search(new):  # a sentence only becomes complete when a word ends
            return []
        targets = answer_targets(answer)
        complete = len(targets) - 1
        if targets and not _WORD_END.search(answer.text, targets[-1][0].start):
            complete -= 1  # the newest sentence's first word is still growing: its predecessor may yet change
        if complete <= self.done:
            return []
        run = live.captured()
        evidence = None
        if self.meter is not None and live.recorder is not None:
            # a pass between decode steps: neither the capture nor the logit recorder may see it
            with paused_capture(), live.recorder.paused():
                evidence = self.meter.evidence(run)
        citations = [
            self.scorer.citation_for(run, k, self.groundedness, evidence) for k in range(self.done, complete)
        ]
        self.done = complete
        return citations


def _remaining_citations(streamed: list[Citation], final: list[Citation]) -> list[Citation]:
    """The final citations not streamed yet (the sentences still open when the text ended), in order. A streamed
    citation the final attribution does not hold (the splitter cut the finished answer elsewhere) is logged: the
    final Attribution is the one to keep."""
    spans = {(c.start, c.end) for c in streamed}
    final_spans = {(c.start, c.end) for c in final}
    moved = [c.text for c in streamed if (c.start, c.end) not in final_spans]
    if moved:
        logger.warning("sentences streamed with a citation were split differently in the finished answer: %s", moved)
    return [c for c in final if (c.start, c.end) not in spans]


class Attributor:
    """Attribute a causal LM's answers to the documents in its prompt with AT2.

    One call (`generate`, `stream`, `attribute`) or the stages one by one (`prepare`, `run`, `score`, with
    `measure_groundedness` and `ablate` as evidence between run and score).

    `estimator` may be a ScoreEstimator, a folder, a reference `.pt` file or a Hub id; by default the
    estimator shipped for this model is used, else uniform average attention (with a warning).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        estimator: ScoreEstimator | str | os.PathLike[str] | None = None,
        template: PromptTemplate | None = None,
        model_id: str | None = None,
        check_model_id: bool = True,
        support_threshold: float | None = None,
        grounded_threshold: float | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.template = template or PromptTemplate()
        self.model_id = model_id or getattr(model.config, "name_or_path", None) or None
        self._runner = ModelRunner(model, tokenizer)
        self.num_layers, self.num_heads = self._runner.num_layers, self._runner.num_heads
        resolved = self._resolve_estimator(estimator)
        resolved.check_compatible(self.num_layers, self.num_heads, self.model_id if check_model_id else None)
        self.scorer = Scorer(resolved, support_threshold, grounded_threshold)

    @property
    def estimator(self) -> ScoreEstimator:
        return self.scorer.estimator

    @property
    def support_threshold(self) -> float:
        return self.scorer.support_threshold

    @property
    def grounded_threshold(self) -> float:
        """Nats: a sentence whose log-odds drop by at least this much without the documents is supported (the
        `grounded_threshold` given, else the estimator's calibrated one)."""
        return float(self.scorer.groundedness(refined=False).threshold)

    @property
    def context_window(self) -> int | None:
        """The model's context window in tokens (None when its config does not say)."""
        return self._runner.context_window

    @property
    def lock(self) -> threading.RLock:
        """The model's lock: every run, pass and capture on this model holds it (hold it to keep the model for
        several calls in a row; it is re-entrant)."""
        return self._runner.lock

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        estimator: ScoreEstimator | str | os.PathLike[str] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> Attributor:
        """Load a local (or Hub) Hugging Face causal LM, a GGUF file (converted once into a cached checkpoint) or
        an optional model family by its short name (`"gemma3-270m"`), and wrap it."""
        from .model_families import load_any_model

        attributor_keys = {"template", "model_id", "check_model_id", "support_threshold", "grounded_threshold"}
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in attributor_keys}
        model, tokenizer = load_any_model(name_or_path, device=device, dtype=dtype, **kwargs)
        return cls(model, tokenizer, estimator=estimator, **own)

    @classmethod
    def default(cls, **kwargs: Any) -> Attributor:
        """The embedded SmolLM2-135M-Instruct with its shipped estimator."""
        from .models import load_default_model

        model, tokenizer = load_default_model()
        return cls(model, tokenizer, **kwargs)

    def _resolve_estimator(self, estimator: Any) -> ScoreEstimator:
        if isinstance(estimator, ScoreEstimator):
            return estimator
        if estimator is not None:
            return ScoreEstimator.from_pretrained(estimator)
        shipped = ScoreEstimator.shipped(self.model_id) if self.model_id else None
        if shipped is not None:
            return shipped
        logger.warning(
            "no trained AT2 estimator is known for %s: using uniform average attention, which is untrained and "
            "less faithful; train one with `at2-rag collect` + `at2-rag train`",
            self.model_id or type(self.model).__name__,
        )
        return ScoreEstimator.uniform(self.num_layers, self.num_heads, model_id=self.model_id)

    # ---- stage 1: prepare ---------------------------------------------------------------------------------
    def prepare(
        self,
        request: str | RequestLike | Sequence[Any] | None = None,
        documents: Sequence[DocumentLike] | None = None,
        history: Sequence[Any] | None = None,
        system_prompt: SystemPrompt = TEMPLATE_DEFAULT,
        answer: str | None = None,
        *,
        prompt: str | None = None,
        query: str = "",
        max_new_tokens: int = 256,
        **generate_kwargs: Any,
    ) -> Prepared:
        """A request checked once and made into what `run` needs (`Prepared`).

        - `request` a question (with `documents`, optional `history`, `system_prompt`, `answer`), an
          `AttributionRequest` or a dict with its keys: at2-rag's own prompt (the template's user turn, the chat
          template) with every source's token span.
        - `request` chat messages (role/content dicts, LangChain/LlamaIndex messages), or `prompt=` the exact
          prompt text: a prompt rendered elsewhere, with `documents` located inside it (`at2_rag.prompting.locate`;
          those not found are listed in `Prepared.unlocated_documents`); `query`, found in it, is scored as the
          question and labels the result.

        With an `answer` the run attributes it with one forward pass; without one it generates (greedy by default;
        `max_new_tokens`, `generate_kwargs`). Raises `InvalidInputError` for malformed input and
        `ContextTooLongError` when the prompt plus the answer (or `max_new_tokens`) exceeds the context window."""
        check_max_new_tokens(max_new_tokens)
        if prompt is not None or _is_messages(request):
            if prompt is not None and request is not None:
                raise InvalidInputError("pass either chat messages or prompt=, not both")
            if history is not None or system_prompt is not TEMPLATE_DEFAULT:
                raise InvalidInputError("a prompt rendered elsewhere already holds its history and system prompt")
            elsewhere = prompt if prompt is not None else cast(Sequence[Any], request)
            located = self._locate(elsewhere, documents or (), query)
            return self._checked(located.prompt, query, answer, max_new_tokens, generate_kwargs)
        if query:
            raise InvalidInputError("query= labels a prompt rendered elsewhere; pass the question as the request")
        parsed = self._request(request, documents, history, system_prompt, answer)
        return self._checked(self._render(parsed), parsed.query, parsed.answer, max_new_tokens, generate_kwargs)

    def _checked(
        self,
        prompt: RenderedPrompt,
        query: str,
        answer: str | None,
        max_new_tokens: int,
        generate_kwargs: Mapping[str, Any],
    ) -> Prepared:
        """The checks every prepared request passes once: the answer (encoded as untrusted text) and the context
        window (prompt plus answer, or plus `max_new_tokens`)."""
        tokens = None
        if answer is not None:
            tokens = encode_with_offsets(self.tokenizer, check_answer(answer))
            self._runner.check_fits(prompt, answer_tokens=len(tokens.token_ids))
        else:
            self._runner.check_fits(prompt, max_new_tokens)
        return Prepared(prompt, query, tokens, max_new_tokens, dict(generate_kwargs))

    # ---- stage 2: run -------------------------------------------------------------------------------------
    @overload
    def run(self, prepared: Prepared, capture: bool = True, hooks: RunHooks | None = None) -> Captured: ...

    @overload
    def run(
        self, prepared: Sequence[Prepared], capture: bool = True, hooks: Sequence[RunHooks | None] | None = None
    ) -> list[Captured]: ...

    def run(
        self,
        prepared: Prepared | Sequence[Prepared],
        capture: bool = True,
        hooks: RunHooks | Sequence[RunHooks | None] | None = None,
    ) -> Captured | list[Captured]:
        """Run prepared requests with attention capture: the answer generated, or (a request with an answer) one
        forward pass over prompt + answer. A list runs in one left-padded batch, each result equal to its run
        alone (the same greedy answer; features equal up to float rounding): all generate with the same settings,
        or all carry an answer. `capture=False` generates without capture (a chat model's turn with no documents):
        the Captured has the answer, its token counts and finish reason, and no features.

        `hooks` (`RunHooks`; one per request of a list) stop a generation early, a batch's row alone while the
        others go on (`finish_reason="stopped"`), and receive its text as it is generated."""
        if isinstance(prepared, Prepared):
            if hooks is not None and not isinstance(hooks, RunHooks):
                raise InvalidInputError("one request takes one RunHooks")
            return self._run_one(prepared, capture, hooks)
        if not capture:
            raise InvalidInputError("a batch always captures: run plain generations one by one")
        batch = _checked_batch(prepared)
        rows = _row_hooks(hooks, len(batch))
        if not batch:
            return []
        prompts = [p.prompt for p in batch]
        if batch[0].answer is not None:
            runs = self._runner.forward_batch(prompts, [p.answer for p in batch if p.answer is not None])
        else:
            runs = self._runner.generate_batch(
                prompts, batch[0].max_new_tokens, hooks=rows, **batch[0].generate_kwargs
            )
        for run, p in zip(runs, batch):
            run.query = p.query
        return runs

    def run_stream(self, prepared: Prepared, capture: bool = True) -> Iterator[str | Captured]:
        """`run` for a request that generates, yielding the answer's text in chunks as it is generated (from a
        generation thread), then the Captured. A bad request raises on the first `next()`; an error in the
        generation is re-raised here."""
        _generating(prepared)
        for item in self._runner.stream(
            prepared.prompt, prepared.max_new_tokens, capture=capture, **prepared.generate_kwargs
        ):
            if isinstance(item, Captured):
                item.query = prepared.query
            yield item

    def _run_one(self, prepared: Prepared, capture: bool = True, hooks: RunHooks | None = None) -> Captured:
        if prepared.answer is not None:
            if not capture:
                raise InvalidInputError("capture=False runs a plain generation: this prepared request has an answer")
            run = self._runner.forward(prepared.prompt, prepared.answer)
        else:
            run = self._runner.generate(
                prepared.prompt, prepared.max_new_tokens, capture=capture, hooks=hooks, **prepared.generate_kwargs
            )
        run.query = prepared.query
        return run

    def span_features(self, captured: Captured, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
        """`[answer tokens, spans, L*H]`: the run's answer rows' attention features to arbitrary prompt token spans
        (token-level collection: every document token its own source), one teacher-forced pass over the run's own
        tokens, so the rows are exactly those its labels are measured on."""
        return self._runner.span_features(captured, spans)

    # ---- evidence (optional passes) -----------------------------------------------------------------------
    def measure_groundedness(
        self, captured: Captured, meter: MeasuredGroundedness | None = None
    ) -> GroundednessEvidence:
        """The measured groundedness evidence of a run: its answer with every document removed and, in a
        conversation, with every earlier turn removed (see `at2_rag.evidence.groundedness`); one pass each over
        the prompt outside them and the answer. `meter`: passes already fed part of this answer (streaming)."""
        if meter is None:
            meter = MeasuredGroundedness(self.model, captured.prompt, captured.prefix_cache, captured.prefix_length)
            captured.prefix_cache = None  # extended by the pass: not the prompt's prefix any more
        with self.lock:
            return meter.evidence(captured)

    def ablate(
        self, captured: Captured, ablations: int, evidence: GroundednessEvidence | None = None
    ) -> AblationEvidence | None:
        """`ablations=k` passes over the run's documents and earlier turns, the most informative k masks (see
        `at2_rag.evidence.ablations`); masks `evidence` already measured are reused. None when there is nothing to
        ablate (k = 0, no documents, an empty answer)."""
        return gather_ablations(self.model, captured, ablations, evidence)

    def gather_evidence(
        self,
        captured: Captured,
        groundedness: GroundednessMode = "measured",
        ablations: int = 0,
        meter: MeasuredGroundedness | None = None,
    ) -> Evidence:
        """The evidence the one-call methods gather: measured groundedness first (when measured), then the
        ablation passes (reusing its masks)."""
        check_groundedness(groundedness)
        check_ablations(ablations)
        measured = self.measure_groundedness(captured, meter) if groundedness == "measured" else None
        return Evidence(measured, self.ablate(captured, ablations, measured))

    # ---- stage 3: score -----------------------------------------------------------------------------------
    def score(
        self,
        captured: Captured,
        evidence: Evidence | GroundednessEvidence | AblationEvidence | None = None,
        groundedness: GroundednessMode | None = None,
    ) -> Attribution:
        """The Attribution of a run: per-document, per-sentence and per-answer-sentence scores and citations.

        `evidence` refines it: measured groundedness (`measure_groundedness`) gives each sentence's exact
        `grounded`; ablation passes (`ablate`) refine the scores. `groundedness` defaults to "measured" when the
        evidence holds it, else "estimated" (the estimator's zero-pass head); "off" computes none."""
        if isinstance(evidence, GroundednessEvidence):
            evidence = Evidence(groundedness=evidence)
        elif isinstance(evidence, AblationEvidence):
            evidence = Evidence(ablations=evidence)
        if groundedness is None:
            groundedness = "measured" if evidence is not None and evidence.groundedness is not None else "estimated"
        check_groundedness(groundedness)
        if groundedness == "measured" and (evidence is None or evidence.groundedness is None):
            raise InvalidInputError('groundedness="measured" needs evidence from measure_groundedness(captured)')
        return self.scorer.attribution(captured, groundedness, evidence)

    def _attribution(
        self,
        captured: Captured,
        ablations: int = 0,
        groundedness: GroundednessMode = "measured",
        meter: MeasuredGroundedness | None = None,
    ) -> Attribution:
        """Evidence, then score: what every one-call method ends with."""
        return self.score(captured, self.gather_evidence(captured, groundedness, ablations, meter), groundedness)

    # ---- one call -----------------------------------------------------------------------------------------
    def generate(
        self,
        query: str | RequestLike | Prepared,
        documents: Sequence[DocumentLike] | None = None,
        history: Sequence[Any] | None = None,
        system_prompt: SystemPrompt = TEMPLATE_DEFAULT,
        max_new_tokens: int = 256,
        ablations: int = 0,
        groundedness: GroundednessMode = "measured",
        **generate_kwargs: Any,
    ) -> Attribution:
        """Generate an answer (greedy by default) while capturing attention; attribute it.

        `groundedness="measured"` (the default) measures each sentence's `grounded` exactly with one pass of the
        answer with every document removed (and one with every earlier turn removed, in a conversation): only the
        prompt outside the documents and the answer are run. "estimated" predicts it at zero cost with the
        estimator's head: for the shipped SmolLM2 estimator, AUROC against the measured label 0.89 ± 0.02 on
        held-out Python documentation, 0.83 ± 0.03 on Debian package descriptions and 0.71 ± 0.05 there when the
        question was asked over another question's documents (docs/training.md); "off" skips it. `grounded`
        measures dependence on the documents, not truth. `ablations=k` pays k ablation
        passes to refine the scores (see `at2_rag.evidence.ablations`).

        `query` may also be an `AttributionRequest` (or a dict with its keys), or a `Prepared` request, instead of
        the separate arguments."""
        check_ablations(ablations)
        check_groundedness(groundedness)
        prepared = self._to_generate(query, documents, history, system_prompt, max_new_tokens, generate_kwargs)
        return self._attribution(self._run_one(prepared), ablations, groundedness)

    def stream(
        self,
        query: str | RequestLike | Prepared,
        documents: Sequence[DocumentLike] | None = None,
        history: Sequence[Any] | None = None,
        system_prompt: SystemPrompt = TEMPLATE_DEFAULT,
        max_new_tokens: int = 256,
        ablations: int = 0,
        sentence_citations: bool = False,
        groundedness: GroundednessMode = "measured",
        **generate_kwargs: Any,
    ) -> Iterator[str | Citation | Attribution]:
        """Yield answer text chunks (str) as they are generated, then the Attribution as the last item.

        With `sentence_citations=True`, each answer sentence's `Citation` is also yielded as soon as the sentence is
        complete, in answer order, after the text chunks that hold it, and the rest when the text ends: one per
        sentence of the final `Attribution.citations`, which are equal to them. A sentence is complete when the
        answer-sentence splitter (`prompting.answer.answer_targets`, the one scoring uses) finds a later sentence
        whose first word is complete. Attention is causal, so that sentence's features no longer change: its
        citation is computed then, from the features captured so far (no extra forward pass), and is its final one.
        It costs reading the capture once per completed sentence. Not with `ablations` > 0 (`InvalidInputError`):
        refined scores exist only after the whole answer.

        Bad input and a prompt + max_new_tokens that exceeds the context window raise on the first `next()`, in
        the caller's thread, before the generation thread starts. `ablations=k` refines after the text ends.

        `groundedness` as in `generate`; measured with `sentence_citations=True`, each completed sentence's tokens
        are run through the documents-free pass as the sentence completes (between decode steps, over a KV cache),
        so the streamed citations carry their measured `grounded` and the whole stream still pays one pass."""
        check_ablations(ablations)
        check_groundedness(groundedness)
        prepared = self._to_generate(query, documents, history, system_prompt, max_new_tokens, generate_kwargs)
        if not sentence_citations:
            for item in self.run_stream(prepared):
                yield self._attribution(item, ablations, groundedness) if isinstance(item, Captured) else item
            return
        if ablations:
            raise InvalidInputError(
                "sentence_citations=True streams each sentence's AT2 citation as it completes, but ablations="
                f"{ablations} refines the scores only after the whole answer: stream with ablations=0, or attribute "
                "with ablations after the text"
            )
        meter = MeasuredGroundedness(self.model, prepared.prompt) if groundedness == "measured" else None
        tracker = _SentenceTracker(self.scorer, groundedness, meter)
        held: deque[Citation] = deque()  # citations whose sentence's text is not all yielded yet
        streamed: list[Citation] = []
        text_length = 0
        for item in self._runner.stream(
            prepared.prompt, prepared.max_new_tokens, on_step=tracker, **prepared.generate_kwargs
        ):
            if isinstance(item, Captured):
                item.query = prepared.query
                attribution = self._attribution(item, 0, groundedness, meter)
                streamed.extend(held)
                yield from held
                yield from _remaining_citations(streamed, attribution.citations)
                yield attribution
                return
            if isinstance(item, Citation):
                held.append(item)
            else:
                text_length += len(item)
                yield item
            while held and held[0].end <= text_length:
                streamed.append(held[0])
                yield held.popleft()

    def attribute(
        self,
        query: str | RequestLike | Prepared,
        documents: Sequence[DocumentLike] | None = None,
        answer: str | None = None,
        history: Sequence[Any] | None = None,
        system_prompt: SystemPrompt = TEMPLATE_DEFAULT,
        ablations: int = 0,
        groundedness: GroundednessMode = "measured",
    ) -> Attribution:
        """Attribute an answer produced elsewhere with one forward pass over prompt + answer (plus the measured
        groundedness pass, see `generate`, and `ablations` refinement passes). `query` may be an
        `AttributionRequest` carrying the answer, or a `Prepared` request with one."""
        check_ablations(ablations)
        check_groundedness(groundedness)
        if isinstance(query, Prepared):
            prepared = self._alone(query, documents, history, system_prompt, answer)
            if prepared.answer is None:
                raise InvalidInputError("attribute needs a prepared request with an answer")
        else:
            parsed = self._request(query, documents, history, system_prompt, answer)
            check_answer(parsed.answer)
            prepared = self._checked(self._render(parsed), parsed.query, parsed.answer, 256, {})
        return self._attribution(self._run_one(prepared), ablations, groundedness)

    def generate_batch(
        self,
        requests: Sequence[RequestLike | Prepared],
        max_new_tokens: int = 256,
        ablations: int = 0,
        groundedness: GroundednessMode = "measured",
        **generate_kwargs: Any,
    ) -> list[Attribution]:
        """`generate` for many requests in one left-padded batch with capture: each result equals the one
        `generate` returns alone (the same greedy answer; scores equal up to float rounding)."""
        parsed = self._requests(requests)
        check_ablations(ablations)
        check_groundedness(groundedness)
        check_max_new_tokens(max_new_tokens)
        if "streamer" in generate_kwargs:
            raise InvalidInputError("generate_batch does not stream: stream each request with `stream`")
        prepared = [
            r
            if isinstance(r, Prepared)
            else self._checked(self._render(r), r.query, None, max_new_tokens, generate_kwargs)
            for r in parsed
        ]
        return [self._attribution(run, ablations, groundedness) for run in self.run(prepared)]

    def attribute_batch(
        self,
        requests: Sequence[RequestLike | Prepared],
        ablations: int = 0,
        groundedness: GroundednessMode = "measured",
    ) -> list[Attribution]:
        """`attribute` for many requests (each with its `answer`) in one left-padded forward pass."""
        parsed = self._requests(requests)
        check_ablations(ablations)
        check_groundedness(groundedness)
        for i, r in enumerate(parsed):
            answer = r.answer if isinstance(r, AttributionRequest) else r.answer.text if r.answer else None
            if not isinstance(answer, str) or not answer.strip():
                raise InvalidInputError(f"request {i}: attribute_batch needs a non-empty answer in every request")
        prepared = [
            r if isinstance(r, Prepared) else self._checked(self._render(r), r.query, r.answer, 256, {}) for r in parsed
        ]
        return [self._attribution(run, ablations, groundedness) for run in self.run(prepared)]

    def attribute_rendered(
        self,
        prompt: str | Sequence[Any],
        documents: Sequence[DocumentLike],
        answer: str | None = None,
        query: str = "",
        max_new_tokens: int = 256,
        ablations: int = 0,
        groundedness: GroundednessMode = "measured",
        **generate_kwargs: Any,
    ) -> Attribution:
        """Attribute an answer to the documents inside a prompt rendered elsewhere (a framework's template).

        `prompt` is the exact prompt text, or chat messages (role/content dicts, LangChain/LlamaIndex messages)
        rendered with the model's chat template. Each document is located in it (`at2_rag.prompting.locate`);
        documents that are not found are listed, with the reason, in `Attribution.unlocated_documents`. With
        `answer` given, one forward pass over prompt + answer; with `answer=None`, the answer is generated after the
        prompt (greedy by default; `max_new_tokens`, `generate_kwargs`) with capture. `query` labels the
        result and, found in the prompt, is scored as the question. Raises `DocumentsNotLocatedError` (a
        `NoDocumentsError`, with `.unlocated`) when no document occurs in the prompt. `ablations=k` refines the
        scores with k ablation passes; `groundedness` as in `generate`.
        """
        check_ablations(ablations)
        check_groundedness(groundedness)
        located = self._locate(prompt, documents, query)
        if not located.located:
            raise DocumentsNotLocatedError(located.unlocated)
        check_max_new_tokens(max_new_tokens)
        prepared = self._checked(located.prompt, query, answer, max_new_tokens, generate_kwargs)
        return self._attribution(self._run_one(prepared), ablations, groundedness)

    def generate_text(
        self,
        prompt: str | Sequence[Any],
        max_new_tokens: int = 256,
        streamer: Any = None,
        **generate_kwargs: Any,
    ) -> str:
        """Plain generation, without capture (a chat model with no documents): the answer text.

        `prompt` is the exact prompt text or chat messages (rendered with the chat template, as in
        `attribute_rendered`). Greedy by default; serialised with every other run on this model. For the token
        counts and finish reason too: `run(prepare(messages), capture=False)`."""
        if streamer is not None:
            generate_kwargs["streamer"] = streamer
        return self.run(self._plain(prompt, max_new_tokens, generate_kwargs), capture=False).answer.text

    def stream_text(
        self, prompt: str | Sequence[Any], max_new_tokens: int = 256, **generate_kwargs: Any
    ) -> Iterator[str]:
        """`generate_text`, yielding the text in chunks as it is generated."""
        for item in self.run_stream(self._plain(prompt, max_new_tokens, generate_kwargs), capture=False):
            if isinstance(item, str):
                yield item

    def _plain(self, prompt: str | Sequence[Any], max_new_tokens: int, generate_kwargs: Mapping[str, Any]) -> Prepared:
        if isinstance(prompt, str):
            return self.prepare(prompt=prompt, max_new_tokens=max_new_tokens, **generate_kwargs)
        return self.prepare(prompt, max_new_tokens=max_new_tokens, **generate_kwargs)

    def _to_generate(
        self,
        query: Any,
        documents: Any,
        history: Any,
        system_prompt: Any,
        max_new_tokens: int,
        generate_kwargs: Mapping[str, Any],
    ) -> Prepared:
        """`generate`/`stream`'s request: a `Prepared` one as it is (nothing else may be given), else prepared to
        generate (an answer a request carries is not used: these methods generate)."""
        if isinstance(query, Prepared):
            if generate_kwargs:
                raise InvalidInputError("a Prepared request already holds its generation settings: pass it alone")
            prepared = self._alone(query, documents, history, system_prompt, None)
            if prepared.answer is not None:
                raise InvalidInputError("this Prepared request carries an answer: attribute it with `attribute`")
            return prepared
        parsed = self._request(query, documents, history, system_prompt)
        check_max_new_tokens(max_new_tokens)
        return self._checked(self._render(parsed), parsed.query, None, max_new_tokens, generate_kwargs)

    @staticmethod
    def _alone(prepared: Prepared, documents: Any, history: Any, system_prompt: Any, answer: Any) -> Prepared:
        if any(v is not None for v in (documents, history, answer)) or system_prompt is not TEMPLATE_DEFAULT:
            raise InvalidInputError("a Prepared request already holds its documents, history and answer: pass it alone")
        return prepared

    @staticmethod
    def _request(
        query: Any, documents: Any, history: Any, system_prompt: Any, answer: str | None = None
    ) -> AttributionRequest:
        """One request from either a request object (or dict) or the separate arguments, never both."""
        if isinstance(query, (AttributionRequest, Mapping)):
            separate = (documents, history, answer)
            if any(v is not None for v in separate) or system_prompt is not TEMPLATE_DEFAULT:
                raise InvalidInputError("pass either a request or query/documents/history/system_prompt, not both")
            return AttributionRequest.coerce(query)
        if not isinstance(query, str):
            raise InvalidInputError(f"query must be a string or an AttributionRequest, got {type(query).__name__}")
        if documents is None:
            raise InvalidInputError("documents must be a list of documents (wrap a single document in a list)")
        return AttributionRequest.coerce(
            {
                "query": query, "documents": documents, "history": history,
                "system_prompt": system_prompt, "answer": answer,
            }
        )

    @staticmethod
    def _requests(requests: Sequence[RequestLike | Prepared]) -> list[AttributionRequest | Prepared]:
        if isinstance(requests, (str, Mapping, AttributionRequest, Prepared)) or not isinstance(requests, Sequence):
            raise InvalidInputError("requests must be a list of AttributionRequest objects or dicts")
        return [r if isinstance(r, Prepared) else AttributionRequest.coerce(r, i) for i, r in enumerate(requests)]

    def render(
        self,
        query: str | RequestLike,
        documents: Sequence[DocumentLike] | None = None,
        history: Sequence[Any] | None = None,
        system_prompt: SystemPrompt = TEMPLATE_DEFAULT,
    ) -> RenderedPrompt:
        """at2-rag's own prompt (the template's user turn, the chat template) with every source's token span, for
        a request or the separate arguments: what `prepare` runs, to look at (no run settings, no length check)."""
        return self._render(self._request(query, documents, history, system_prompt))

    def _render(self, parsed: AttributionRequest) -> RenderedPrompt:
        docs = normalize_documents(parsed.documents)
        template = self.template
        if parsed.system_prompt is not TEMPLATE_DEFAULT:
            template = template.model_copy(update={"system_prompt": parsed.system_prompt})
        return render_prompt(self.tokenizer, parsed.query, docs, template, parsed.history or None)

    def locate(
        self, prompt: str | Sequence[Any], documents: Sequence[DocumentLike] = (), query: str = ""
    ) -> LocatedPrompt:
        """A prompt rendered elsewhere, with `documents` located inside it (see `at2_rag.prompting.locate`), and its
        earlier turns and question as context sources (`query`, when given, is found in the prompt): what
        `prepare` runs for such a prompt, to look at.

        A string is used as the exact prompt text; messages are rendered with the chat template first."""
        return self._locate(prompt, documents, query)

    def _locate(
        self, prompt: str | Sequence[Any], documents: Sequence[DocumentLike] = (), query: str = ""
    ) -> LocatedPrompt:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidInputError("the prompt must be a non-empty string or a list of messages")
            return locate_prompt(self.tokenizer, prompt, documents, used_chat_template=False, query=query)
        chat = render_messages_with_ranges(self.tokenizer, prompt)
        return locate_prompt(self.tokenizer, chat, documents, query=query)


def _is_messages(value: Any) -> bool:
    """Chat messages (a list of role/content dicts or framework message objects), not a request or a question."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, Mapping, AttributionRequest))


def _generating(prepared: Any) -> None:
    if not isinstance(prepared, Prepared):
        raise InvalidInputError(f"run_stream takes a Prepared request (from `prepare`), got {type(prepared).__name__}")
    if prepared.answer is not None:
        raise InvalidInputError("run_stream streams a generation: this prepared request carries an answer")


def _row_hooks(hooks: Any, rows: int) -> list[RunHooks | None] | None:
    """A batch's hooks, one per row (None: no row has any)."""
    if hooks is None:
        return None
    if isinstance(hooks, RunHooks) or not isinstance(hooks, Sequence) or len(hooks) != rows:
        raise InvalidInputError(f"a batch of {rows} takes a list of {rows} RunHooks (or None for a row)")
    if any(h is not None and not isinstance(h, RunHooks) for h in hooks):
        raise InvalidInputError("hooks must be RunHooks (or None for a row)")
    return list(hooks)


def _checked_batch(prepared: Sequence[Prepared]) -> list[Prepared]:
    """A batch `run` can take: prepared requests that all generate with the same settings, or all carry an
    answer."""
    if isinstance(prepared, (str, Mapping)) or not isinstance(prepared, Sequence):
        raise InvalidInputError("run takes a Prepared request or a list of them")
    batch = list(prepared)
    for i, p in enumerate(batch):
        if not isinstance(p, Prepared):
            raise InvalidInputError(f"item {i}: run takes Prepared requests (from `prepare`), got {type(p).__name__}")
        if "streamer" in p.generate_kwargs:
            raise InvalidInputError("generate_batch does not stream: stream each request with `stream`")
    if batch and len({p.run_settings() for p in batch}) > 1:
        raise InvalidInputError(
            "a batch runs one way: every request generates with the same max_new_tokens and generate keyword "
            "arguments, or every request carries an answer; run the others in their own batch"
        )
    return batch
