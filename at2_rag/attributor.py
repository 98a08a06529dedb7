"""The Attributor: generate (or take) an answer with attention capture and score every source with the estimator."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from .capture import capture_attention, install_capture, model_shape, text_config
from .errors import ContextTooLongError, DocumentsNotLocatedError, InvalidInputError
from .estimator import ScoreEstimator
from .features import AnswerTokens, answer_targets, decode_with_offsets, encode_with_offsets, target_features
from .locate import LocatedPrompt, locate_prompt
from .grounding import GroundednessCalibration
from .refine import RefinementPrior, check_ablations, choose_masks, refine_scores
from .prompt import PromptTemplate, RenderedPrompt, render_messages_with_ranges, render_prompt
from .result import (
    MAX_CITED_PER_SENTENCE,
    RELATIVE_CITATION_CUTOFF,
    Attribution,
    Citation,
    CitedDocument,
    ContextSource,
    DocumentScore,
    SentenceScore,
)
from .sources import CharSpan, DocumentLike, normalize_documents

logger = logging.getLogger(__name__)

_UNSET: Any = object()
DEFAULT_SUPPORT_THRESHOLD = 0.05


@dataclass
class CapturedRun:
    """Everything one model run produced: the prompt, the answer and per-token features `[T, S, L*H]`
    (sources = documents first, then sentences)."""

    prompt: RenderedPrompt
    answer: AnswerTokens
    token_features: torch.Tensor
    finish_reason: str | None = None

    @property
    def num_documents(self) -> int:
        return len(self.prompt.doc_sources)


_MODEL_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _model_lock(model: torch.nn.Module) -> threading.RLock:
    """One lock per model (kept off the model so it can still be copied or pickled): runs on one model are
    serialised, since a capture records every attention call made while it is active."""
    with _LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


def _check_max_new_tokens(max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")


def _check_answer(answer: Any) -> None:
    if not isinstance(answer, str) or not answer.strip():
        raise InvalidInputError("answer must be a non-empty string")


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
        self.num_layers, self.num_heads = model_shape(model)
        install_capture(model)
        self.estimator = self._resolve_estimator(estimator)
        self.estimator.check_compatible(
            self.num_layers, self.num_heads, self.model_id if check_model_id else None
        )
        if support_threshold is None:
            support_threshold = float(self.estimator.metadata.get("support_threshold", DEFAULT_SUPPORT_THRESHOLD))
        self.support_threshold = support_threshold
        # nats: a sentence is supported when removing every document is predicted to lower its log-odds this much
        self.grounded_threshold = grounded_threshold
        self._lock = _model_lock(model)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        estimator: ScoreEstimator | str | os.PathLike[str] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> "Attributor":
        """Load a local (or Hub) Hugging Face causal LM and wrap it."""
        from .models import load_model

        attributor_keys = {"template", "model_id", "check_model_id", "support_threshold", "grounded_threshold"}
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in attributor_keys}
        model, tokenizer = load_model(name_or_path, device=device, dtype=dtype, **kwargs)
        return cls(model, tokenizer, estimator=estimator, **own)

    @classmethod
    def default(cls, **kwargs: Any) -> "Attributor":
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
        query: str,
        documents: Sequence[DocumentLike],
        history: Sequence[Any] | None = None,
        system_prompt: str | None = _UNSET,
        max_new_tokens: int = 256,
        ablations: int = 0,
        **generate_kwargs: Any,
    ) -> Attribution:
        """Generate an answer (greedy by default) while capturing attention; attribute it. No extra passes,
        unless `ablations=k`: k ablation passes then refine the document scores (see `at2_rag.refine`)."""
        check_ablations(ablations)
        run = self.generate_run(query, documents, history, system_prompt, max_new_tokens, **generate_kwargs)
        return self.build_attribution(run, query, ablations)

    def stream(
        self,
        query: str,
        documents: Sequence[DocumentLike],
        history: Sequence[Any] | None = None,
        system_prompt: str | None = _UNSET,
        max_new_tokens: int = 256,
        ablations: int = 0,
        **generate_kwargs: Any,
    ) -> Iterator[str | Attribution]:
        """Yield answer text chunks as they are generated, then the Attribution as the last item.

        Bad input and a prompt + max_new_tokens that exceeds the context window raise on the first `next()`, in
        the caller's thread, before the generation thread starts. `ablations=k` refines after the text ends."""
        check_ablations(ablations)
        prompt = self.render(query, documents, history, system_prompt)
        for item in self.stream_prompt_run(prompt, max_new_tokens, **generate_kwargs):
            yield self.build_attribution(item, query, ablations) if isinstance(item, CapturedRun) else item

    def attribute(
        self,
        query: str,
        documents: Sequence[DocumentLike],
        answer: str,
        history: Sequence[Any] | None = None,
        system_prompt: str | None = _UNSET,
        ablations: int = 0,
    ) -> Attribution:
        """Attribute an answer produced elsewhere with one forward pass over prompt + answer (plus `ablations`
        refinement passes)."""
        check_ablations(ablations)
        run = self.forward_run(query, documents, answer, history, system_prompt)
        return self.build_attribution(run, query, ablations)

    def attribute_rendered(
        self,
        prompt: str | Sequence[Any],
        documents: Sequence[DocumentLike],
        answer: str | None = None,
        query: str = "",
        max_new_tokens: int = 256,
        ablations: int = 0,
        **generate_kwargs: Any,
    ) -> Attribution:
        """Attribute an answer to the documents inside a prompt rendered elsewhere (a framework's template).

        `prompt` is the exact prompt text, or chat messages (role/content dicts, LangChain/LlamaIndex messages)
        rendered with the model's chat template. Each document is located in it (`at2_rag.locate`); documents
        that are not found are listed, with the reason, in `Attribution.unlocated_documents`. With `answer`
        given, one forward pass over prompt + answer; with `answer=None`, the answer is generated after the
        prompt (greedy by default; `max_new_tokens`, `generate_kwargs`) with capture. `query` labels the
        result and, found in the prompt, is scored as the question. Raises `DocumentsNotLocatedError` (a `NoDocumentsError`, with `.unlocated`) when no document
        occurs in the prompt. `ablations=k` refines the scores with k ablation passes.
        """
        check_ablations(ablations)
        located = self.locate(prompt, documents, query)
        if not located.located:
            raise DocumentsNotLocatedError(located.unlocated)
        if answer is None:
            run = self.generate_prompt_run(located.prompt, max_new_tokens, **generate_kwargs)
        else:
            run = self.forward_prompt_run(located.prompt, answer)
        return self.build_attribution(run, query, ablations)

    def generate_text(
        self,
        prompt: str | Sequence[Any],
        max_new_tokens: int = 256,
        streamer: Any = None,
        **generate_kwargs: Any,
    ) -> str:
        """Plain generation, without capture (a chat model with no documents): the answer text.

        `prompt` is the exact prompt text or chat messages (rendered with the chat template, as in
        `attribute_rendered`). Greedy by default; serialised with every other run on this model (`lock`)."""
        prompt_run = self.generate_prompt_run(
            self.locate(prompt).prompt, max_new_tokens, capture=False, streamer=streamer, **generate_kwargs
        )
        return prompt_run.answer.text

    def stream_text(
        self, prompt: str | Sequence[Any], max_new_tokens: int = 256, **generate_kwargs: Any
    ) -> Iterator[str]:
        """`generate_text`, yielding the text in chunks as it is generated."""
        for item in self.stream_prompt_run(self.locate(prompt).prompt, max_new_tokens, capture=False, **generate_kwargs):
            if isinstance(item, str):
                yield item

    # ---- prompts ----------------------------------------------------------------------------------------
    def render(
        self,
        query: str,
        documents: Sequence[DocumentLike],
        history: Sequence[Any] | None = None,
        system_prompt: str | None = _UNSET,
    ) -> RenderedPrompt:
        """at2-rag's own prompt (the template's user turn, the chat template) with every source's token span."""
        docs = normalize_documents(documents)
        template = self.template
        if system_prompt is not _UNSET:
            template = template.model_copy(update={"system_prompt": system_prompt})
        return render_prompt(self.tokenizer, query, docs, template, history)

    def locate(
        self, prompt: str | Sequence[Any], documents: Sequence[DocumentLike] = (), query: str = ""
    ) -> LocatedPrompt:
        """A prompt rendered elsewhere, with `documents` located inside it (see `at2_rag.locate`), and its
        earlier turns and question as context sources (`query`, when given, is found in the prompt).

        A string is used as the exact prompt text; messages are rendered with the chat template first."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidInputError("the prompt must be a non-empty string or a list of messages")
            return locate_prompt(self.tokenizer, prompt, documents, used_chat_template=False, query=query)
        chat = render_messages_with_ranges(self.tokenizer, prompt)
        return locate_prompt(self.tokenizer, chat, documents, query=query)

    @property
    def context_window(self) -> int | None:
        config = text_config(self.model)
        return getattr(config, "max_position_embeddings", None)

    def check_fits(
        self, prompt: RenderedPrompt | int, max_new_tokens: int = 0, *, answer_tokens: int | None = None
    ) -> None:
        """Raise `ContextTooLongError` unless the prompt (a RenderedPrompt or its number of tokens) fits the
        context window, and so does the prompt plus `max_new_tokens` to generate, or plus an answer of
        `answer_tokens` tokens."""
        num = prompt if isinstance(prompt, int) else prompt.num_tokens
        limit = self.context_window
        if limit is None:
            return
        checks = [(num, "prompt")]
        if answer_tokens is not None:
            checks.append((num + answer_tokens, "prompt plus answer"))
        if max_new_tokens:
            checks.append((num + max_new_tokens, f"prompt plus max_new_tokens={max_new_tokens}"))
        for needed, what in checks:
            if needed > limit:
                raise ContextTooLongError(needed, limit, what)

    # ---- the model ----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def lock(self) -> threading.RLock:
        """The model's lock (one per model, shared by every Attributor on it). Every run holds it, since a
        capture records every attention call made while it is active: hold it for any other use of the model."""
        return self._lock

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Token ids that end generation (the generation config's and the tokenizer's)."""
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    @property
    def pad_token_id(self) -> int | None:
        """The tokenizer's pad token, else the smallest end-of-sequence id."""
        pad = self.tokenizer.pad_token_id
        if pad is None:
            eos = self.eos_token_ids
            pad = min(eos) if eos else None
        return pad

    # ---- runs -------------------------------------------------------------------------------------------
    def generate_run(
        self,
        query: str,
        documents: Sequence[DocumentLike],
        history: Sequence[Any] | None = None,
        system_prompt: str | None = _UNSET,
        max_new_tokens: int = 256,
        **generate_kwargs: Any,
    ) -> CapturedRun:
        """`render` + `generate_prompt_run`."""
        _check_max_new_tokens(max_new_tokens)
        prompt = self.render(query, documents, history, system_prompt)
        return self.generate_prompt_run(prompt, max_new_tokens, **generate_kwargs)

    def forward_run(
        self,
        query: str,
        documents: Sequence[DocumentLike],
        answer: str,
        history: Sequence[Any] | None = None,
        system_prompt: str | None = _UNSET,
    ) -> CapturedRun:
        """`render` + `forward_prompt_run`."""
        _check_answer(answer)
        prompt = self.render(query, documents, history, system_prompt)
        return self.forward_prompt_run(prompt, answer)

    @staticmethod
    def _source_spans(prompt: RenderedPrompt) -> list[tuple[int, int]]:
        """Documents, then sentences, then context parts: the column order of every captured feature tensor."""
        return prompt.doc_token_spans + prompt.sentence_token_spans + prompt.context_token_spans

    def generate_prompt_run(
        self,
        prompt: RenderedPrompt,
        max_new_tokens: int = 256,
        capture: bool = True,
        streamer: Any = None,
        **generate_kwargs: Any,
    ) -> CapturedRun:
        """Generate after a ready prompt (greedy by default) while capturing attention to its sources.

        With `capture=False` it is a plain generation: no features (`token_features` has no source columns)
        and no per-token answer offsets. `streamer` is handed to `generate` (e.g. a `TextIteratorStreamer`)."""
        _check_max_new_tokens(max_new_tokens)
        self.check_fits(prompt, max_new_tokens)
        input_ids = torch.tensor([prompt.input_ids], device=self.device)
        kwargs: dict[str, Any] = {"do_sample": False, "pad_token_id": self.pad_token_id}
        if not generate_kwargs.get("do_sample"):
            kwargs.update(temperature=None, top_p=None, top_k=None)
        kwargs.update(generate_kwargs)
        if streamer is not None:
            kwargs["streamer"] = streamer
        ctx = (
            capture_attention(self.model, self._source_spans(prompt), prompt.num_tokens - 1)
            if capture
            else contextlib.nullcontext(None)
        )
        with self.lock, torch.no_grad(), ctx as state:
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                **kwargs,
            )
        generated = output[0, prompt.num_tokens :].tolist()
        eos = self.eos_token_ids
        finish = "length"
        while generated and generated[-1] in eos:
            generated.pop()
            finish = "stop"
        if not generated:
            logger.warning("the model produced an empty answer")
        if state is None:
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            answer = AnswerTokens(token_ids=generated, text=text, char_spans=[])
            features = torch.zeros(len(generated), 0, self.num_layers * self.num_heads)
        else:
            answer = decode_with_offsets(self.tokenizer, generated)
            features = state.features()[0][: len(generated)]
        return CapturedRun(prompt, answer, features, finish)

    def forward_prompt_run(self, prompt: RenderedPrompt, answer: str) -> CapturedRun:
        """One forward pass over a ready prompt + `answer`, capturing the answer rows' attention to its sources."""
        _check_answer(answer)
        tokens = encode_with_offsets(self.tokenizer, answer)
        self.check_fits(prompt, answer_tokens=len(tokens.token_ids))
        ids = torch.tensor([prompt.input_ids + tokens.token_ids], device=self.device)
        start = prompt.num_tokens - 1
        with self.lock, torch.no_grad(), capture_attention(
            self.model, self._source_spans(prompt), start, start + len(tokens.token_ids)
        ) as state:
            self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=1)
        return CapturedRun(prompt, tokens, state.features()[0], None)

    def stream_prompt_run(
        self,
        prompt: RenderedPrompt,
        max_new_tokens: int = 256,
        capture: bool = True,
        **generate_kwargs: Any,
    ) -> Iterator[str | CapturedRun]:
        """`generate_prompt_run` in a worker thread: yield text chunks as they are generated, then the
        CapturedRun. The length check runs in the caller's thread, before the worker starts; an error in the
        worker is re-raised here."""
        from transformers import TextIteratorStreamer

        _check_max_new_tokens(max_new_tokens)
        self.check_fits(prompt, max_new_tokens)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["run"] = self.generate_prompt_run(
                    prompt, max_new_tokens, capture=capture, streamer=streamer, **generate_kwargs
                )
            except BaseException as exc:  # surfaced in the consuming thread
                outcome["error"] = exc
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        for chunk in streamer:
            if chunk:
                yield chunk
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        yield outcome["run"]

    # ---- scoring ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def build_attribution(self, run: CapturedRun, query: str, ablations: int = 0) -> Attribution:
        """Scores, citations and groundedness of a run: documents, their sentences and the context parts
        (earlier turns, system prompt, question) scored by the same estimator. With `ablations=k`, k ablation
        passes of the answer refine the document scores (whole answer and each answer sentence) with the AT2
        scores as the prior; document sentences and context parts keep their AT2 scores."""
        prompt, answer = run.prompt, run.answer
        columns = _Columns(len(prompt.doc_sources), len(prompt.sentence_sources))
        rows_all = [i for i, (a, b) in enumerate(answer.char_spans) if b > a] or list(range(len(answer.token_ids)))
        targets = answer_targets(answer)
        scores = [self.estimator(target_features(run.token_features, rows)).tolist() for rows in [rows_all] + [r for _, r in targets]]
        passes = 0
        if check_ablations(ablations) > 0 and columns.docs and answer.token_ids:
            refined, passes = self._refine(
                run, [rows_all] + [rows for _, rows in targets], [columns.documents(s) for s in scores], ablations
            )
            scores = [r + s[columns.docs :] for r, s in zip(refined, scores)]
        whole, per_sentence = scores[0], scores[1:]
        grounding = self._groundedness(refined=passes > 0)

        sentences_by_doc: dict[int, list[tuple[int, Any]]] = {}
        for j, src in enumerate(prompt.sentence_sources):
            sentences_by_doc.setdefault(src.doc_index, []).append((j, src))
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
            self._citation(answer.text, span, target, prompt, columns, sentences_by_doc, grounding)
            for (span, _), target in zip(targets, per_sentence)
        ]
        if citations:
            supported = any(c.supported for c in citations)
        else:
            supported = bool(grounding.grounded(doc_scores) >= grounding.threshold) if doc_scores else False
        return Attribution(
            query=query,
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
            extra_forward_passes=passes,
        )

    def _groundedness(self, refined: bool) -> GroundednessCalibration:
        """Refined scores are the ablation surrogate's effects (in prior units): their sum in nats is the
        surrogate's own prediction; AT2 scores go through the estimator's calibration."""
        prior = RefinementPrior.from_metadata(self.estimator.metadata)
        calibration = GroundednessCalibration.from_metadata(self.estimator.metadata, fallback_scale=prior.scale)
        if self.grounded_threshold is not None:
            calibration = dataclasses.replace(calibration, threshold=float(self.grounded_threshold))
        if refined:  # the surrogate's own sum is in nats; earlier turns were not ablated, so they keep their weight
            return dataclasses.replace(calibration, scale=prior.scale, offset=0.0, calibrated=True)
        return calibration

    def _refine(
        self, run: CapturedRun, target_rows: list[list[int]], prior: list[list[float]], ablations: int
    ) -> tuple[list[list[float]], int]:
        """k ablation passes over the documents (prefix-shared, batched), then each target's document scores
        refined with its AT2 scores as the prior. Returns the refined scores and the passes paid."""
        from .training.ablation import ablated_answer_logit_probs, target_log_odds

        prompt, answer = run.prompt, run.answer
        masks = choose_masks(len(prompt.doc_token_spans), ablations, prompt.text + "\x00" + answer.text)
        ids = prompt.input_ids + answer.token_ids
        with self.lock:
            logit_probs = ablated_answer_logit_probs(
                self.model, ids, len(answer.token_ids), prompt.doc_token_spans, masks, batch_size=8
            )
        settings = RefinementPrior.from_metadata(self.estimator.metadata)
        refined = [
            refine_scores(torch.tensor(scores), masks, target_log_odds(logit_probs, rows), settings).tolist()
            for rows, scores in zip(target_rows, prior)
        ]
        return refined, int(masks.shape[0])

    def _citation(
        self,
        answer_text: str,
        span: CharSpan,
        scores: list[float],
        prompt: RenderedPrompt,
        columns: "_Columns",
        sentences_by_doc: dict[int, list[tuple[int, Any]]],
        grounding: GroundednessCalibration,
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
        history = [score for part, score in zip(prompt.context_parts, context_scores) if part.kind == "history"]
        grounded = grounding.grounded(doc_scores, history)
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
        return Citation(
            text=answer_text[span.start : span.end],
            start=span.start,
            end=span.end,
            documents=cited_docs,
            cited=cited,
            supported=supported,
            grounded=grounded,
            context=[c for c in context if c.score >= self.support_threshold][:MAX_CITED_PER_SENTENCE],
        )


@dataclass(frozen=True)
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
