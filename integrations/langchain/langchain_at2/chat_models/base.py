"""ChatAT2: a local Hugging Face chat model that says which retrieved documents its answer used (AT2)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables.config import run_in_executor
from pydantic import ConfigDict, Field

from at2_rag import Attribution, AttributionRequest, Attributor, Captured, Prepared, PromptTemplate, get_micro_batcher
from at2_rag.errors import InvalidInputError
from at2_rag.evidence.groundedness import GroundednessMode
from at2_rag.models import DEFAULT_MODEL_ID
from at2_rag.prompting.request import TEMPLATE_DEFAULT, SystemPrompt

from .._loading import get_attributor, is_default_model
from .._messages import split_for_core, to_chat_dicts
from ..annotations import PROVIDER, attribution_metadata, trace_summary, trim_attribution
from ..documents import extract_documents, to_at2_documents

logger = logging.getLogger(__name__)

# call-time kwargs LangChain itself may pass through to `_generate`; they mean nothing to a local model
_IGNORED_KWARGS = frozenset({"ls_structured_output_format", "stream", "timeout", "max_retries"})


@dataclass
class _Plan:
    mode: Literal["plain", "template", "prompt"]
    attributor: Attributor
    model_name: str
    max_new_tokens: int
    generate_kwargs: dict[str, Any]
    stop: list[str]
    ablations: Any = 0
    """as given: checked by the core when the answer is attributed (`MicroBatcher.submit`, `Attributor.stream`)"""
    groundedness: Any = "measured"
    prepared: Prepared | None = None
    """template mode: at2-rag's own prompt (query, documents, history, system prompt); prompt mode: the messages
    as given, with the documents located inside them (`Attributor.prepare`, checked once)"""
    messages: list[dict[str, str]] | None = None
    """plain mode: the messages to generate after (no documents, no attribution)"""


def _usage(run: Captured) -> tuple[str, None, int, int, str | None]:
    """A plain generation's text, no attribution, its prompt and answer token counts and finish reason."""
    return run.answer.text, None, run.prompt.num_tokens, len(run.answer.token_ids), run.finish_reason


class _StopFilter:
    """Pass streamed text through, holding back what could be the start of a stop sequence; cut at a stop."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buffer = ""
        self.done = False

    def push(self, text: str) -> str:
        if self.done:
            return ""
        self.buffer += text
        if not self.stops:
            out, self.buffer = self.buffer, ""
            return out
        cut = _stop_index(self.buffer, self.stops)
        if cut is not None:
            out, self.buffer, self.done = self.buffer[:cut], "", True
            return out
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.buffer)), 0, -1):
                if self.buffer.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        out, self.buffer = self.buffer[: len(self.buffer) - hold], self.buffer[len(self.buffer) - hold :]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.done else self.buffer), ""
        return out


def _to_trace(run_manager: CallbackManagerForLLMRun | None, metadata: dict[str, Any]) -> None:
    """The attribution's summary into this run's trace metadata (the dict every tracer of the run holds).

    `BaseChatModel.stream` does not hand `_stream` its run manager: there the attribution reaches the trace in the
    run's outputs (the last chunk's `response_metadata["at2"]`) only."""
    if run_manager is not None and PROVIDER in metadata and isinstance(run_manager.metadata, dict):
        run_manager.metadata[PROVIDER] = trace_summary(metadata[PROVIDER])


def _stop_index(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


class ChatAT2(BaseChatModel):
    """A local Hugging Face chat model whose answers come with AT2 document attribution.

    By default it runs the embedded SmolLM2-135M-Instruct (offline, CPU); pass `model` (a local folder or Hub
    id) or a ready `at2_rag.Attributor` as `attributor`. Weights load on first use and are shared by every
    instance with the same model.

    **Documents.** Without documents this is a plain chat model (prompt = the model's chat template over the
    messages). Documents reach it in any of these ways:

    * `model.invoke(messages, documents=docs)` or `model.bind(documents=docs)`;
    * `text-plain` content blocks in a message (`langchain_at2.documents_message(question, docs)`);
    * `message.additional_kwargs["documents"]`.

    Documents may be LangChain `Document`s (id from `doc.id` or `metadata["id"]`, title from
    `metadata["title"]`, url from `metadata["url"]`/`metadata["source"]`), at2-rag `Document`s, dicts or strings.

    Where the documents go (`documents_mode`):

    * `"auto"` (default): if the documents' text already occurs in the messages (you formatted them into your
      own prompt, e.g. with a ChatPromptTemplate), the messages are used exactly as given and the documents are
      located inside them; otherwise at2-rag's prompt template puts them in the last human turn (the last human
      message is the question, earlier turns the history, leading system messages the system prompt).
    * `"prompt"`: always locate them in the messages (error if none is found).
    * `"template"`: always render them with the template.

    **Output.** `AIMessage.content` is the answer text. With documents, `response_metadata["at2"]` holds the
    attribution (`scores`: doc id -> score; `citations` per answer sentence; `supported`; see
    `langchain_at2.annotations.attribution_metadata`), and `message.content_blocks` carries one standard
    `Citation` annotation per (answer sentence, supporting document); with `output_version="v1"` those blocks
    are the content. Streaming yields text as it is generated; the attribution arrives on the last chunk.
    Earlier turns (human and AI messages before the last human message), the system prompt and the question
    are scored too (`context_scores`, `context_sources`), and each citation says how much the sentence
    depends on the documents at all (`grounded`) and which earlier turns it draws on (`context`).

    **Budget.** `ablations=k` (field, or per call: `invoke(..., ablations=k)` / `bind(ablations=k)`) runs k
    ablation passes after the answer and refines the document scores with the AT2 scores as the prior (k=0,
    the default, is plain AT2 at zero extra passes). `response_metadata["at2"]["extra_forward_passes"]` says how
    many passes were paid (k is capped at 2^number of documents).

    **Groundedness.** `groundedness` (field, or per call: `invoke(..., groundedness=...)` / `bind(...)`) says how
    each citation's `grounded` is obtained. `"measured"` (the default) measures how much the sentence depends on
    the documents: the drop, in nats, of its log-odds when every document is removed from attention, with one
    extra teacher-forced pass over the non-document part of the prompt and the answer (in a conversation one more
    pass removes the earlier turns: `context_grounded`). It measures dependence on the documents, not truth.
    `"estimated"` predicts it with the estimator at zero cost (less reliable on documents unlike its training
    data); `"off"` skips it (`grounded` None, every sentence `supported`). `extra_forward_passes` counts the
    measured passes too.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model_name: str | None = Field(default=None, alias="model")
    """Local folder or Hugging Face id of a causal LM; None = the embedded SmolLM2-135M-Instruct."""
    attributor: Any = Field(default=None, exclude=True)
    """A ready `at2_rag.Attributor` (overrides `model_name`, `estimator`, `device`)."""
    estimator: str | None = None
    """AT2 estimator: a folder, a reference `.pt` or a Hub id; None = the one shipped for the model."""
    device: str | None = None
    max_new_tokens: int = Field(default=256, alias="max_tokens", ge=1)
    temperature: float | None = None
    """None or 0 = greedy decoding; > 0 samples."""
    top_p: float | None = None
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    system_prompt: str | None = None
    """System prompt for template mode when the messages have none; None = at2-rag's RAG system prompt."""
    template: PromptTemplate | None = Field(default=None, exclude=True)
    """How the template puts documents and the question into the user turn; None = the attributor's."""
    documents_mode: Literal["auto", "prompt", "template"] = "auto"
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for `transformers` `generate` (e.g. `repetition_penalty`)."""
    streaming: bool = False
    ablations: int = Field(default=0, ge=0, strict=True)
    """Ablation passes that refine the document scores after each answer with documents (0 = plain AT2)."""
    groundedness: GroundednessMode = "measured"
    """How each citation's `grounded` is obtained: "measured" (one extra pass without the documents), "estimated"
    (zero-cost estimate) or "off"."""

    # ---- LangChain plumbing ---------------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "chat-at2"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self._model_id(),
            "estimator": self.estimator,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": self.stop,
            "system_prompt": self.system_prompt,
            "documents_mode": self.documents_mode,
            "model_kwargs": self.model_kwargs,
            "ablations": self.ablations,
            "groundedness": self.groundedness,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=PROVIDER,
            ls_model_name=kwargs.get("model") or self._model_id(),
            ls_model_type="chat",
            ls_max_tokens=kwargs.get("max_tokens", kwargs.get("max_new_tokens", self.max_new_tokens)),
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    def _model_id(self) -> str:
        if self.attributor is not None and getattr(self.attributor, "model_id", None):
            return str(self.attributor.model_id)
        return DEFAULT_MODEL_ID if is_default_model(self.model_name) else str(self.model_name)

    def get_attributor(self, model: str | None = None) -> Attributor:
        """The Attributor this model generates with (loaded and cached on first use)."""
        if model is not None and model != self.model_name:
            attributor = get_attributor(model, estimator=self.estimator, device=self.device)
        elif self.attributor is not None:
            attributor = self.attributor
        else:
            attributor = get_attributor(self.model_name, estimator=self.estimator, device=self.device)
        if self.template is not None and attributor.template != self.template:
            attributor = copy.copy(attributor)  # shares model, tokenizer, estimator and lock
            attributor.template = self.template
        return attributor

    # ---- planning -------------------------------------------------------------------------------------------
    def _plan(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> _Plan:
        kwargs = dict(kwargs)
        explicit = kwargs.pop("documents", None)
        model = kwargs.pop("model", None)
        max_new = kwargs.pop("max_new_tokens", None)
        max_tokens = kwargs.pop("max_tokens", None)
        max_new_tokens = int(max_new or max_tokens or self.max_new_tokens)
        temperature = kwargs.pop("temperature", self.temperature)
        top_p = kwargs.pop("top_p", self.top_p)
        ablations = kwargs.pop("ablations", self.ablations)
        groundedness = kwargs.pop("groundedness", self.groundedness)
        extra = {**self.model_kwargs, **(kwargs.pop("generate_kwargs", None) or {})}
        unknown = sorted(k for k in kwargs if k not in _IGNORED_KWARGS)
        if unknown:
            logger.warning("ChatAT2 ignores unknown call arguments: %s", ", ".join(unknown))

        attributor = self.get_attributor(model)
        stops = [s for s in [*(stop or []), *(self.stop or [])] if s]
        gen: dict[str, Any] = {}
        if temperature and temperature > 0:
            gen.update(do_sample=True, temperature=float(temperature))
            if top_p is not None:
                gen["top_p"] = float(top_p)
        if stops:
            gen.update(stop_strings=stops, tokenizer=attributor.tokenizer)
        gen.update(extra)
        plan = _Plan(
            mode="plain",
            attributor=attributor,
            model_name=str(model or attributor.model_id or self._model_id()),
            max_new_tokens=max_new_tokens,
            generate_kwargs=gen,
            stop=stops,
            ablations=ablations,
            groundedness=groundedness,
        )

        messages, embedded = extract_documents(messages)
        if explicit is not None and not isinstance(explicit, (list, tuple)):
            raise InvalidInputError("documents must be a list of documents (wrap a single document in a list)")
        raw_docs = [*(explicit or []), *embedded]
        if not raw_docs:
            plan.messages = to_chat_dicts(messages)
            return plan

        documents = to_at2_documents(raw_docs)
        run_args: dict[str, Any] = {"max_new_tokens": max_new_tokens, **gen}
        if self.documents_mode != "template":
            query = split_for_core(messages)[2] if any(m.type == "human" for m in messages) else ""
            prepared = attributor.prepare(to_chat_dicts(messages), documents, query=query, **run_args)
            unlocated = prepared.unlocated_documents
            if prepared.prompt.doc_sources:
                if unlocated:
                    logger.warning(
                        "ChatAT2: %d of %d documents are not in the prompt and get no score: %s",
                        len(unlocated),
                        len(documents),
                        "; ".join(f"{u.id}: {u.reason}" for u in unlocated),
                    )
                plan.mode, plan.prepared = "prompt", prepared
                return plan
            if self.documents_mode == "prompt":
                raise InvalidInputError(
                    "documents_mode='prompt' but none of the documents' text occurs in the messages: "
                    + "; ".join(f"{u.id}: {u.reason}" for u in unlocated)
                )
        found, history, query = split_for_core(messages)
        system: SystemPrompt = found if found is not None else (
            TEMPLATE_DEFAULT if self.system_prompt is None else self.system_prompt
        )
        request = AttributionRequest(query=query, documents=documents, history=history, system_prompt=system)
        plan.mode, plan.prepared = "template", attributor.prepare(request, **run_args)
        return plan

    # ---- results --------------------------------------------------------------------------------------------
    def _finish(
        self,
        plan: _Plan,
        text: str,
        attribution: Attribution | None,
        prompt_tokens: int,
        answer_tokens: int,
        finish_reason: str | None,
    ) -> tuple[str, dict[str, Any], UsageMetadata]:
        cut = _stop_index(text, plan.stop) if plan.stop else None
        if cut is not None:
            text, finish_reason = text[:cut], "stop"
            if attribution is not None:
                attribution = trim_attribution(attribution, cut)
        metadata: dict[str, Any] = {
            "model_name": plan.model_name,
            "model_provider": PROVIDER,
            "finish_reason": finish_reason,
        }
        if attribution is not None:
            metadata[PROVIDER] = attribution_metadata(attribution, mode=plan.mode)
        usage = UsageMetadata(
            input_tokens=prompt_tokens, output_tokens=answer_tokens, total_tokens=prompt_tokens + answer_tokens
        )
        return text, metadata, usage

    def _run(self, plan: _Plan) -> tuple[str, dict[str, Any], UsageMetadata]:
        """One planned call through the core: the prepared request (template or prompt mode) through the model's
        shared micro-batcher, else a plain generation (`Attributor.generate_text`)."""
        att = plan.attributor
        if plan.prepared is not None:
            # through the model's shared micro-batcher: concurrent calls (`batch`, `abatch`, threads, async callers)
            # share one batched generation; a call alone runs exactly the single-request path
            future = get_micro_batcher(att).submit(
                plan.prepared, ablations=plan.ablations, groundedness=plan.groundedness
            )
            result = future.result()
            return self._finish(
                plan, result.answer, result, result.num_prompt_tokens, result.num_answer_tokens, result.finish_reason
            )
        run = att.run(self._plain(plan), capture=False)
        return self._finish(plan, *_usage(run))

    @staticmethod
    def _plain(plan: _Plan) -> Prepared:
        """Plain mode: the messages prepared for a generation without capture (no documents, no attribution)."""
        assert plan.messages is not None
        return plan.attributor.prepare(plan.messages, max_new_tokens=plan.max_new_tokens, **plan.generate_kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        plan = self._plan(messages, stop, kwargs)
        text, metadata, usage = self._run(plan)
        _to_trace(run_manager, metadata)
        message = AIMessage(content=text, response_metadata=metadata, usage_metadata=usage)
        return ChatResult(generations=[ChatGeneration(message=message)], llm_output={"model_name": plan.model_name})

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # generation is CPU/GPU bound and serialised per model: run it in a worker thread
        return await run_in_executor(
            None, self._generate, messages, stop, run_manager.get_sync() if run_manager else None, **kwargs
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        plan = self._plan(messages, stop, kwargs)
        att = plan.attributor
        items: Iterator[Any]
        if plan.prepared is not None:
            items = att.stream(plan.prepared, ablations=plan.ablations, groundedness=plan.groundedness)
        else:
            items = att.run_stream(self._plain(plan), capture=False)
        filt = _StopFilter(plan.stop)
        final: Any = None

        def chunk_of(piece: str) -> ChatGenerationChunk:
            chunk = ChatGenerationChunk(
                message=AIMessageChunk(content=piece, response_metadata={"model_provider": PROVIDER})
            )
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            return chunk

        for item in items:
            if isinstance(item, str):
                piece = filt.push(item)
                if piece:
                    yield chunk_of(piece)
            else:
                final = item
        tail = filt.flush()
        if tail:
            yield chunk_of(tail)
        if isinstance(final, Attribution):
            text, metadata, usage = self._finish(
                plan, final.answer, final, final.num_prompt_tokens, final.num_answer_tokens, final.finish_reason
            )
        elif isinstance(final, Captured):
            text, metadata, usage = self._finish(plan, *_usage(final))
        else:  # pragma: no cover - the core always ends a stream with its result
            raise RuntimeError("the generation ended without a result")
        last = ChatGenerationChunk(
            message=AIMessageChunk(
                content="", response_metadata=metadata, usage_metadata=usage, chunk_position="last"
            )
        )
        if run_manager:
            run_manager.on_llm_new_token("", chunk=last)
        _to_trace(run_manager, metadata)
        yield last
