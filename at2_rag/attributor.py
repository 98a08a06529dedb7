"""The Attributor: at2-rag's front door. Renders the prompt, has the runner generate (or take) the answer with
attention capture, and has the scorer turn the captured features into an Attribution.

    sources -> prompt (`prompt`, `locate`) -> capture (`runner`) -> features -> estimator -> result (`scoring`)
"""

from __future__ import annotations

import logging
import os
import re
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .attribution.estimator import ScoreEstimator
from .attribution.refine import check_ablations
from .attribution.result import Attribution, Citation
from .attribution.scoring import Scorer
from .capture._runner import CapturedRun, LiveGeneration, ModelRunner, check_answer, check_max_new_tokens
from .capture.attention import paused_capture
from .capture.features import answer_targets
from .errors import DocumentsNotLocatedError, InvalidInputError
from .evidence.groundedness import GroundednessEvidence, GroundednessMode, MeasuredGroundedness, check_groundedness
from .prompting.locate import LocatedPrompt, locate_prompt
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
        self.runner = ModelRunner(model, tokenizer)
        self.num_layers, self.num_heads = self.runner.num_layers, self.runner.num_heads
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
    def grounded_threshold(self) -> float | None:
        return self.scorer.grounded_threshold

    @property
    def context_window(self) -> int | None:
        """The model's context window in tokens (None when its config does not say)."""
        return self.runner.context_window

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        estimator: ScoreEstimator | str | os.PathLike[str] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> Attributor:
        """Load a local (or Hub) Hugging Face causal LM and wrap it."""
        from .models import load_model

        attributor_keys = {"template", "model_id", "check_model_id", "support_threshold", "grounded_threshold"}
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in attributor_keys}
        model, tokenizer = load_model(name_or_path, device=device, dtype=dtype, **kwargs)
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

    # ---- public API -------------------------------------------------------------------------------------
    def generate(
        self,
        query: str | RequestLike,
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
        passes to refine the scores (see `at2_rag.attribution.refine`).

        `query` may also be an `AttributionRequest` (or a dict with its keys) instead of the separate arguments."""
        request = self._request(query, documents, history, system_prompt)
        check_ablations(ablations)
        check_groundedness(groundedness)
        run = self.runner.generate(self.render(request), max_new_tokens, **generate_kwargs)
        return self.build_attribution(run, request.query, ablations, groundedness)

    def stream(
        self,
        query: str | RequestLike,
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
        answer-sentence splitter (`features.answer_targets`, the one scoring uses) finds a later sentence whose
        first word is complete. Attention is causal, so that sentence's features no longer change: its citation
        is computed then, from the features captured so far (no extra forward pass), and is its final one. It costs
        reading the capture once per completed sentence. Not with `ablations` > 0 (`InvalidInputError`): refined
        scores exist only after the whole answer.

        Bad input and a prompt + max_new_tokens that exceeds the context window raise on the first `next()`, in
        the caller's thread, before the generation thread starts. `ablations=k` refines after the text ends.

        `groundedness` as in `generate`; measured with `sentence_citations=True`, each completed sentence's tokens
        are run through the documents-free pass as the sentence completes (between decode steps, over a KV cache),
        so the streamed citations carry their measured `grounded` and the whole stream still pays one pass."""
        request = self._request(query, documents, history, system_prompt)
        check_ablations(ablations)
        check_groundedness(groundedness)
        if not sentence_citations:
            for item in self.runner.stream(self.render(request), max_new_tokens, **generate_kwargs):
                if isinstance(item, CapturedRun):
                    yield self.build_attribution(item, request.query, ablations, groundedness)
                else:
                    yield item
            return
        if ablations:
            raise InvalidInputError(
                "sentence_citations=True streams each sentence's AT2 citation as it completes, but ablations="
                f"{ablations} refines the scores only after the whole answer: stream with ablations=0, or attribute "
                "with ablations after the text"
            )
        prompt = self.render(request)
        meter = MeasuredGroundedness(self.model, prompt) if groundedness == "measured" else None
        tracker = _SentenceTracker(self.scorer, groundedness, meter)
        held: deque[Citation] = deque()  # citations whose sentence's text is not all yielded yet
        streamed: list[Citation] = []
        text_length = 0
        for item in self.runner.stream(prompt, max_new_tokens, on_step=tracker, **generate_kwargs):
            if isinstance(item, CapturedRun):
                attribution = self.build_attribution(item, request.query, 0, groundedness, meter)
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
        query: str | RequestLike,
        documents: Sequence[DocumentLike] | None = None,
        answer: str | None = None,
        history: Sequence[Any] | None = None,
        system_prompt: SystemPrompt = TEMPLATE_DEFAULT,
        ablations: int = 0,
        groundedness: GroundednessMode = "measured",
    ) -> Attribution:
        """Attribute an answer produced elsewhere with one forward pass over prompt + answer (plus the measured
        groundedness pass, see `generate`, and `ablations` refinement passes). `query` may be an
        `AttributionRequest` carrying the answer."""
        request = self._request(query, documents, history, system_prompt, answer)
        check_ablations(ablations)
        check_groundedness(groundedness)
        check_answer(request.answer)
        run = self.runner.forward(self.render(request), request.answer)  # type: ignore[arg-type]
        return self.build_attribution(run, request.query, ablations, groundedness)

    def generate_batch(
        self,
        requests: Sequence[RequestLike],
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
        prompts = [self.render(r) for r in parsed]
        runs = self.runner.generate_batch(prompts, max_new_tokens, **generate_kwargs)
        return [self.build_attribution(run, r.query, ablations, groundedness) for run, r in zip(runs, parsed)]

    def attribute_batch(
        self, requests: Sequence[RequestLike], ablations: int = 0, groundedness: GroundednessMode = "measured"
    ) -> list[Attribution]:
        """`attribute` for many requests (each with its `answer`) in one left-padded forward pass."""
        parsed = self._requests(requests)
        check_ablations(ablations)
        check_groundedness(groundedness)
        for i, r in enumerate(parsed):
            if not isinstance(r.answer, str) or not r.answer.strip():
                raise InvalidInputError(f"request {i}: attribute_batch needs a non-empty answer in every request")
        prompts = [self.render(r) for r in parsed]
        runs = self.runner.forward_batch(prompts, [r.answer or "" for r in parsed])
        return [self.build_attribution(run, r.query, ablations, groundedness) for run, r in zip(runs, parsed)]

    def capture(self, request: RequestLike, max_new_tokens: int = 256, **generate_kwargs: Any) -> CapturedRun:
        """The captured run of a request, before scoring: its answer generated, or, with `request.answer`, one
        forward pass (what collection and evaluation score many ways)."""
        parsed = AttributionRequest.coerce(request)
        prompt = self.render(parsed)
        if parsed.answer is not None:
            return self.runner.forward(prompt, parsed.answer)
        return self.runner.generate(prompt, max_new_tokens, **generate_kwargs)

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
        rendered with the model's chat template. Each document is located in it (`at2_rag.prompting.locate`); documents
        that are not found are listed, with the reason, in `Attribution.unlocated_documents`. With `answer`
        given, one forward pass over prompt + answer; with `answer=None`, the answer is generated after the
        prompt (greedy by default; `max_new_tokens`, `generate_kwargs`) with capture. `query` labels the
        result and, found in the prompt, is scored as the question. Raises `DocumentsNotLocatedError` (a
        `NoDocumentsError`, with `.unlocated`) when no document occurs in the prompt. `ablations=k` refines the
        scores with k ablation passes; `groundedness` as in `generate`.
        """
        check_ablations(ablations)
        check_groundedness(groundedness)
        located = self.locate(prompt, documents, query)
        if not located.located:
            raise DocumentsNotLocatedError(located.unlocated)
        if answer is None:
            run = self.runner.generate(located.prompt, max_new_tokens, **generate_kwargs)
        else:
            run = self.runner.forward(located.prompt, answer)
        return self.build_attribution(run, query, ablations, groundedness)

    def build_attribution(
        self,
        run: CapturedRun,
        query: str,
        ablations: int = 0,
        groundedness: GroundednessMode = "measured",
        meter: MeasuredGroundedness | None = None,
    ) -> Attribution:
        """Score a captured run (see `Scorer.attribution`): measured groundedness pays its passes first (`meter`:
        passes already fed part of this answer), then `ablations=k` pays k refinement passes."""
        check_groundedness(groundedness)
        evidence = self.measure_groundedness(run, meter) if groundedness == "measured" else None
        return self.scorer.attribution(run, query, ablations, self.runner.ablated_logit_probs, groundedness, evidence)

    def measure_groundedness(self, run: CapturedRun, meter: MeasuredGroundedness | None = None) -> GroundednessEvidence:
        """The measured groundedness evidence of a run: its answer with every document removed and, in a
        conversation, with every earlier turn removed (see `at2_rag.evidence.groundedness`)."""
        if meter is None:
            meter = MeasuredGroundedness(self.model, run.prompt, run.prefix_cache, run.prefix_length)
            run.prefix_cache = None  # extended by the pass: not the prompt's prefix any more
        with self.runner.lock:
            return meter.evidence(run)

    def generate_text(
        self,
        prompt: str | Sequence[Any],
        max_new_tokens: int = 256,
        streamer: Any = None,
        **generate_kwargs: Any,
    ) -> str:
        """Plain generation, without capture (a chat model with no documents): the answer text.

        `prompt` is the exact prompt text or chat messages (rendered with the chat template, as in
        `attribute_rendered`). Greedy by default; serialised with every other run on this model."""
        run = self.runner.generate(
            self.locate(prompt).prompt, max_new_tokens, capture=False, streamer=streamer, **generate_kwargs
        )
        return run.answer.text

    def stream_text(
        self, prompt: str | Sequence[Any], max_new_tokens: int = 256, **generate_kwargs: Any
    ) -> Iterator[str]:
        """`generate_text`, yielding the text in chunks as it is generated."""
        for item in self.runner.stream(self.locate(prompt).prompt, max_new_tokens, capture=False, **generate_kwargs):
            if isinstance(item, str):
                yield item

    # ---- prompts ----------------------------------------------------------------------------------------
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
    def _requests(requests: Sequence[RequestLike]) -> list[AttributionRequest]:
        if isinstance(requests, (str, Mapping, AttributionRequest)) or not isinstance(requests, Sequence):
            raise InvalidInputError("requests must be a list of AttributionRequest objects or dicts")
        return [AttributionRequest.coerce(r, i) for i, r in enumerate(requests)]

    def render(
        self,
        query: str | RequestLike,
        documents: Sequence[DocumentLike] | None = None,
        history: Sequence[Any] | None = None,
        system_prompt: SystemPrompt = TEMPLATE_DEFAULT,
    ) -> RenderedPrompt:
        """at2-rag's own prompt (the template's user turn, the chat template) with every source's token span,
        for a request or the separate arguments."""
        parsed = self._request(query, documents, history, system_prompt)
        docs = normalize_documents(parsed.documents)
        template = self.template
        if parsed.system_prompt is not TEMPLATE_DEFAULT:
            template = template.model_copy(update={"system_prompt": parsed.system_prompt})
        return render_prompt(self.tokenizer, parsed.query, docs, template, parsed.history or None)

    def locate(
        self, prompt: str | Sequence[Any], documents: Sequence[DocumentLike] = (), query: str = ""
    ) -> LocatedPrompt:
        """A prompt rendered elsewhere, with `documents` located inside it (see `at2_rag.prompting.locate`), and its
        earlier turns and question as context sources (`query`, when given, is found in the prompt).

        A string is used as the exact prompt text; messages are rendered with the chat template first."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidInputError("the prompt must be a non-empty string or a list of messages")
            return locate_prompt(self.tokenizer, prompt, documents, used_chat_template=False, query=query)
        chat = render_messages_with_ranges(self.tokenizer, prompt)
        return locate_prompt(self.tokenizer, chat, documents, query=query)
