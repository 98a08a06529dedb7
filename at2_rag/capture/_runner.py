"""The model runner: generation and forward passes with attention capture, streaming, batching and the model lock.

Everything here is about running the model; what the captured features mean (scores, citations) is `scoring`'s.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from ..errors import ContextTooLongError
from ..prompting.answer import AnswerTokens, decode_with_offsets
from ..prompting.render import RenderedPrompt
from .attention import CaptureState, capture_attention, install_capture, model_shape, text_config
from .captured import Captured, model_lock
from .hooks import RowControl, RunHooks, TeeStreamer
from .logits import GeneratedLogitProbs
from .masked import cache_argument, full_attention_cache, token_logit_probs

logger = logging.getLogger(__name__)

def source_spans(prompt: RenderedPrompt) -> list[tuple[int, int]]:
    """Documents, then sentences, then context parts: the column order of every captured feature tensor."""
    return prompt.doc_token_spans + prompt.sentence_token_spans + prompt.context_token_spans


class ModelRunner:
    """Runs one causal LM for at2-rag: greedy-by-default generation or a forward pass, with capture."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.num_layers, self.num_heads = model_shape(model)
        install_capture(model)
        self._lock = model_lock(model)

    # ---- the model ----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def lock(self) -> threading.RLock:
        """The model's lock (one per model, shared by every runner on it). Every run holds it, since a capture
        records every attention call made while it is active: hold it for any other use of the model."""
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

    @property
    def context_window(self) -> int | None:
        return getattr(text_config(self.model), "max_position_embeddings", None)

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

    def _generate_kwargs(self, generate_kwargs: dict[str, Any], prompt_length: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"do_sample": False, "pad_token_id": self.pad_token_id}
        if not generate_kwargs.get("do_sample"):
            kwargs.update(temperature=None, top_p=None, top_k=None)
        kwargs.update(generate_kwargs)
        stops = self.stop_strings(generate_kwargs)
        if stops:  # our own check of the decoded tail: transformers' indexes the whole vocabulary on every call
            kwargs["stop_strings"] = None
            kwargs["stopping_criteria"] = _stop_strings_criteria(
                self.tokenizer, stops, prompt_length, kwargs.get("stopping_criteria")
            )
        return kwargs

    def _hooked(
        self, kwargs: dict[str, Any], hooks: Sequence[RunHooks | None], prompt_width: int
    ) -> RowControl | None:
        """The rows' hooks in one control: its stopping criterion added to `kwargs` when a row may be stopped; it is
        the streamer too when a row wants its text (`control.streams`). None when no row has any hook."""
        control = RowControl(self.tokenizer, hooks, prompt_width, self.eos_token_ids)
        if not (control.stops or control.streams):
            return None
        if control.stops:
            from transformers import StoppingCriteriaList

            given = kwargs.get("stopping_criteria") or []
            kwargs["stopping_criteria"] = StoppingCriteriaList([*given, control.criterion()])
        return control

    def stop_strings(self, generate_kwargs: dict[str, Any] | None = None) -> list[str]:
        """Text that ends an answer (`stop_strings` given to generate, else the generation config's: a base
        model's checkpoint names them, see `at2_rag.model_families`); the answer is the text before it."""
        given = (generate_kwargs or {}).get("stop_strings", getattr(self.model.generation_config, "stop_strings", None))
        return [given] if isinstance(given, str) else list(given or [])

    def _answer(
        self, generated: list[int], captured: bool, stop_strings: Sequence[str] = ()
    ) -> tuple[AnswerTokens, str]:
        """Strip trailing end-of-sequence (and pad) tokens, and everything from a stop string on; the decoded
        answer and why generation ended."""
        eos = self.eos_token_ids
        finish = "length"
        while generated and generated[-1] in eos:
            generated.pop()
            finish = "stop"
        cut = None
        if stop_strings:
            found = _before_stop_string(self.tokenizer, generated, stop_strings)
            if found is not None:
                kept, cut = found
                generated, finish = generated[:kept], "stop"
        if not generated:
            logger.warning("the model produced an empty answer")
        if captured:
            answer = decode_with_offsets(self.tokenizer, generated)
        else:
            answer = AnswerTokens(generated, self.tokenizer.decode(generated, skip_special_tokens=True), [])
        if cut is not None and cut < len(answer.text):  # a token holds the text's end and the stop string's start
            spans = [(min(a, cut), min(b, cut)) for a, b in answer.char_spans]
            answer = AnswerTokens(answer.token_ids, answer.text[:cut], spans)
        return answer, finish

    # ---- one request ----------------------------------------------------------------------------------------
    def generate(
        self,
        prompt: RenderedPrompt,
        max_new_tokens: int = 256,
        capture: bool = True,
        streamer: Any = None,
        on_state: Callable[[CaptureState], None] | None = None,
        recorder: GeneratedLogitProbs | None = None,
        hooks: RunHooks | None = None,
        **generate_kwargs: Any,
    ) -> Captured:
        """Generate after a ready prompt (greedy by default) while capturing attention to its sources.

        With `capture=False` it is a plain generation: no features (`token_features` has no source columns)
        and no per-token answer offsets. `streamer` is handed to `generate` (e.g. a `TextIteratorStreamer`).
        `on_state` is called with the live CaptureState before the first forward pass (not at all without
        capture): a streamer may then read `state.features()` in its `put`, which runs in the generation thread
        between decode steps (see `stream(on_step=...)`); no other thread may touch the state. `recorder` (made
        here when not given) records the answer's logit-probs during a captured generation. `hooks` may stop the
        answer early (`finish_reason="stopped"`) and receive its text as it is generated."""
        input_ids = torch.tensor([prompt.input_ids], device=self.device)
        kwargs = self._generate_kwargs(generate_kwargs, prompt.num_tokens)
        control = self._hooked(kwargs, [hooks], prompt.num_tokens)
        texts = control if control is not None and control.streams else None
        streamer = TeeStreamer(streamer, texts) if texts is not None and streamer is not None else streamer or texts
        if streamer is not None:
            kwargs["streamer"] = streamer
        ctx = (
            capture_attention(self.model, source_spans(prompt), prompt.num_tokens - 1)
            if capture
            else contextlib.nullcontext(None)
        )
        if capture and recorder is None:
            recorder = GeneratedLogitProbs(self.model)
        prefix_length = _prefix_length(prompt)
        # a cache of our own (unless the caller gave one), so the prompt's prefix outlives the generation
        shares_prefix = capture and prefix_length > 0 and self._cache_arg not in kwargs
        cache = full_attention_cache(self.model) if shares_prefix else None
        if cache is not None:
            kwargs[self._cache_arg] = cache
        logits_ctx = recorder if capture and recorder is not None else contextlib.nullcontext(None)
        with self.lock, torch.no_grad(), ctx as state, logits_ctx:
            if state is not None and on_state is not None:
                on_state(state)
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                **kwargs,
            )
        generated = output[:, prompt.num_tokens :]
        answer, finish = self._answer(
            _kept(generated[0].tolist(), control, 0), state is not None, self.stop_strings(generate_kwargs)
        )
        finish = "stopped" if control is not None and control.stopped(0) and finish == "length" else finish
        if state is None or recorder is None:
            features = torch.zeros(len(answer.token_ids), 0, self.num_layers * self.num_heads)
            return Captured(prompt, answer, features, finish)
        features = state.features()[0][: len(answer.token_ids)]
        recorded = recorder.finish(generated)
        logit_probs = None if recorded is None else recorded[0][: len(answer.token_ids)]
        if cache is not None:
            cache.crop(prefix_length - cache.get_seq_length())  # keep the positions before the first document
        return Captured(
            prompt, answer, features, finish, logit_probs, cache, prefix_length if cache is not None else 0
        )

    def forward(self, prompt: RenderedPrompt, tokens: AnswerTokens) -> Captured:
        """One forward pass over a ready prompt + an answer's tokens, capturing the answer rows' attention to its
        sources."""
        features, logit_probs = self._teacher_forced(prompt, tokens.token_ids, source_spans(prompt))
        return Captured(prompt, tokens, features, None, logit_probs)

    def _teacher_forced(
        self, prompt: RenderedPrompt, token_ids: Sequence[int], spans: Sequence[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`[answer tokens, spans, L*H]` features and `[answer tokens]` logit-probs: one pass over prompt +
        `token_ids`, capturing the answer rows' attention to `spans`."""
        ids = torch.tensor([prompt.input_ids + list(token_ids)], device=self.device)
        start = prompt.num_tokens - 1
        with (
            self.lock,
            torch.no_grad(),
            capture_attention(self.model, list(spans), start, start + len(token_ids)) as state,
        ):
            out = self.model(
                input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=len(token_ids) + 1
            )
        logit_probs = token_logit_probs(out.logits[0, :-1], ids[0, start + 1 :]).cpu()
        return state.features()[0], logit_probs

    def stream(
        self,
        prompt: RenderedPrompt,
        max_new_tokens: int = 256,
        capture: bool = True,
        on_step: Callable[[LiveGeneration], Iterable[Any]] | None = None,
        **generate_kwargs: Any,
    ) -> Iterator[Any]:
        """`generate` in a worker thread: yield text chunks (str) as they are generated, then the Captured. The
        length check runs in the caller's thread, before the worker starts; an error in the worker (`on_step`'s
        included) is re-raised here.

        `on_step(live)` is called in the generation thread after every generated token, between decode steps (no
        attention call in flight), with the `LiveGeneration` so far; whatever it returns is yielded, in order with
        the text chunks, before the Captured. It may call `live.captured()` (features of the tokens so far)."""
        from transformers import TextIteratorStreamer

        live = LiveGeneration(prompt, self.tokenizer)
        if capture:
            live.recorder = GeneratedLogitProbs(self.model)
        streamer = (
            TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            if on_step is None
            else _step_streamer(self.tokenizer, live, on_step)
        )
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["run"] = self.generate(
                    prompt,
                    max_new_tokens,
                    capture=capture,
                    streamer=streamer,
                    on_state=live.attach,
                    recorder=live.recorder,
                    **generate_kwargs,
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

    def span_features(self, run: Captured, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
        """`[answer tokens, spans, L*H]`: the run's answer rows' attention features to arbitrary prompt spans
        (token-level collection: every document token its own source), one teacher-forced pass over the run's
        own tokens, so the rows are exactly those the run's labels are measured on."""
        return self._teacher_forced(run.prompt, run.answer.token_ids, spans)[0]

    # ---- many requests in one batch ------------------------------------------------------------------------
    def _left_padded(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Ids and attention mask of left-padded sequences, and each row's padding length."""
        width = max(len(s) for s in sequences)
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        pads = [width - len(s) for s in sequences]
        ids = torch.tensor([[pad] * p + list(s) for p, s in zip(pads, sequences)], device=self.device)
        mask = torch.tensor([[0] * p + [1] * len(s) for p, s in zip(pads, sequences)], device=self.device)
        return ids, mask, pads

    @functools.cached_property
    def _cache_arg(self) -> str:
        return cache_argument(self.model)

    def _prefill_rows(self, sequences: Sequence[Sequence[int]], pads: Sequence[int], length: int) -> Any | None:
        """A batch KV cache of the first `length` positions of left-padded rows, each row's real tokens run alone.

        A padded batch needs an explicit mask, and CPU attention with a mask takes the slow path that materialises
        every score: a long prompt prefilled in a padded batch cost ~4x its rows run one by one. Each row alone
        uses the fast causal kernel; its keys and values are then left-padded into one cache (the padding is masked
        by the attention mask from then on). None for models whose cache is not plain full attention (sliding
        windows): they prefill in the padded batch."""
        cache = full_attention_cache(self.model)
        if cache is None:
            return None
        rows: list[list[tuple[torch.Tensor, torch.Tensor]] | None] = []
        for seq, pad in zip(sequences, pads):
            real = length - pad
            if real <= 0:
                rows.append(None)
                continue
            ids = torch.tensor([list(seq[:real])], device=self.device)
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            # the output names its cache as forward's keyword does (`out.past_key_values` warns on transformers 5.x)
            rows.append([(layer.keys, layer.values) for layer in getattr(out, self._cache_arg).layers])
        template = next(r for r in rows if r is not None)
        for layer, (k0, v0) in enumerate(template):
            keys, values = [], []
            for row in rows:
                k, v = row[layer] if row is not None else (k0[:, :, :0], v0[:, :, :0])
                missing = length - k.shape[2]
                keys.append(torch.nn.functional.pad(k, (0, 0, missing, 0)))
                values.append(torch.nn.functional.pad(v, (0, 0, missing, 0)))
            cache.update(torch.cat(keys), torch.cat(values), layer)
        return cache

    @staticmethod
    def _batch_spans(prompts: Sequence[RenderedPrompt], pads: Sequence[int]) -> list[list[tuple[int, int]]]:
        """Every row's own source spans, shifted by its padding (each row reduces against its own sources)."""
        return [[(a + pad, b + pad) for a, b in source_spans(prompt)] for prompt, pad in zip(prompts, pads)]

    def generate_batch(
        self,
        prompts: Sequence[RenderedPrompt],
        max_new_tokens: int = 256,
        hooks: Sequence[RunHooks | None] | None = None,
        **generate_kwargs: Any,
    ) -> list[Captured]:
        """Generate after several prompts in one left-padded batch, with capture; each run as `generate` alone
        would return it (the same greedy tokens; features equal up to float rounding). `hooks` (one per row, or
        None) stop a row early (the others go on) and stream each row's text as it is generated.

        Left padding makes every prompt end at the same position, so one capture window covers every row's
        answer; padding keys are masked for each row, and each row keeps its own source columns."""
        if not prompts:
            return []
        ids, mask, pads = self._left_padded([p.input_ids for p in prompts])
        row_spans = self._batch_spans(prompts, pads)
        width = ids.shape[1]
        kwargs = self._generate_kwargs(generate_kwargs, width)
        control = self._hooked(kwargs, list(hooks) if hooks is not None else [None] * len(prompts), width)
        if control is not None and control.streams:
            kwargs["streamer"] = control
        with self.lock, torch.no_grad():
            cache = self._prefill_rows([p.input_ids for p in prompts], pads, width - 1) if width > 1 else None
            if cache is not None:
                kwargs[self._cache_arg] = cache
            with capture_attention(
                self.model,
                (),
                width - 1,
                left_padding=pads,
                start_position=0 if cache is None else width - 1,
                row_spans=row_spans,
            ) as state, GeneratedLogitProbs(self.model) as recorder:
                output = self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, **kwargs
                )
        features = state.features()
        logit_probs = recorder.finish(output[:, width:])
        runs = []
        for row, prompt in enumerate(prompts):
            # a row that ended early is filled with padding up to the batch's end
            answer, finish = self._answer(
                _kept(_until_first_stop(output[row, width:].tolist(), self.eos_token_ids), control, row),
                True,
                self.stop_strings(generate_kwargs),
            )
            finish = "stopped" if control is not None and control.stopped(row) and finish == "length" else finish
            rows = len(answer.token_ids)
            own = features[row, :rows, : len(row_spans[row])]
            own_logit_probs = None if logit_probs is None else logit_probs[row, :rows].clone()
            runs.append(Captured(prompt, answer, own.clone(), finish, own_logit_probs))
        return runs

    def forward_batch(self, prompts: Sequence[RenderedPrompt], tokens: Sequence[AnswerTokens]) -> list[Captured]:
        """`forward` for several prompt + answer pairs in one left-padded pass, each run as `forward` alone
        would return it (features equal up to float rounding)."""
        if not prompts:
            return []
        ids, mask, pads = self._left_padded([p.input_ids + t.token_ids for p, t in zip(prompts, tokens)])
        row_spans = self._batch_spans(prompts, pads)
        width = ids.shape[1]
        # row i predicts its answer from position pad_i + prompt_i - 1 to the end: capture from the earliest
        starts = [pad + p.num_tokens - 1 for pad, p in zip(pads, prompts)]
        first = min(starts)
        sequences = [p.input_ids + t.token_ids for p, t in zip(prompts, tokens)]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with self.lock, torch.no_grad():
            cache = self._prefill_rows(sequences, pads, first) if first > 0 else None
            begin = 0 if cache is None else first
            with capture_attention(
                self.model, (), first, width - 1, left_padding=pads, start_position=begin, row_spans=row_spans
            ) as state:
                cached = {} if cache is None else {self._cache_arg: cache, "use_cache": True}
                out = self.model(
                    input_ids=ids[:, begin:],
                    attention_mask=mask,
                    position_ids=positions[:, begin:],
                    logits_to_keep=width - first,  # every row's answer predictions, from the earliest
                    **({"use_cache": False} | cached),
                )
        features = state.features()
        runs = []
        for row, (prompt, encoded) in enumerate(zip(prompts, tokens)):
            lo = starts[row] - first
            count = len(encoded.token_ids)
            rows = features[row, lo : lo + count, : len(row_spans[row])].clone()
            logits = out.logits[row, lo : lo + count]
            logit_probs = token_logit_probs(logits, ids[row, starts[row] + 1 : starts[row] + 1 + count]).cpu()
            runs.append(Captured(prompt, encoded, rows, None, logit_probs))
        return runs


class LiveGeneration:
    """A generation in progress, as seen from the generation thread between two decode steps (a streamer's `put`):
    the answer's tokens so far, their char spans, and on request the captured run of those tokens.

    Attention is causal, so the features of tokens already generated never change as more are generated: the run
    `captured()` returns now holds the same rows (up to float rounding) as the final run."""

    def __init__(self, prompt: RenderedPrompt, tokenizer: Any) -> None:
        self.prompt = prompt
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self._spans: list[tuple[int, int]] = []
        self._text = ""
        self._end = 0  # end of the last complete character
        self._state: CaptureState | None = None
        self.recorder: GeneratedLogitProbs | None = None  # the generation's logit-probs (set by `stream`)

    def attach(self, state: CaptureState) -> None:
        """`ModelRunner.generate`'s `on_state`: the capture state this generation records into."""
        self._state = state

    def extend(self, token_ids: Sequence[int]) -> None:
        """Add generated tokens, giving each its char span exactly as `features.decode_with_offsets` would (one
        prefix decode per new token instead of one per token of the whole answer)."""
        for token in token_ids:
            self.token_ids.append(int(token))
            text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
            self._text = text
            if text.endswith("\ufffd"):  # incomplete multi-byte character
                self._spans.append((self._end, self._end))
                continue
            end = max(self._end, len(text))
            self._spans.append((self._end, end))
            self._end = end

    @property
    def answer(self) -> AnswerTokens:
        """The answer so far (its text may end inside a word, or with end-of-sequence tokens' empty spans)."""
        return AnswerTokens(token_ids=list(self.token_ids), text=self._text, char_spans=list(self._spans))

    def captured(self) -> Captured:
        """The captured run of the tokens generated so far. Reads the capture (`CaptureState.features`: deferred
        rows are reduced now, and later reads reuse them), so call it only from the generation thread, between
        decode steps, and only when needed: each call copies every row read so far."""
        if self._state is None:
            raise RuntimeError("this generation runs without capture: it has no features to read")
        features = self._state.features()[0]
        count = len(self.token_ids)
        if features.shape[0] < count:
            raise RuntimeError(f"{features.shape[0]} captured rows for {count} generated tokens")
        logit_probs = None
        if self.recorder is not None:
            recorded = self.recorder.finish(torch.tensor([self.token_ids], dtype=torch.long))
            logit_probs = None if recorded is None else recorded[0][:count]
        # features are a view: the capture never rewrites them
        return Captured(self.prompt, self.answer, features[:count], None, logit_probs)


@functools.cache
def _step_streamer_class() -> type:
    from transformers import TextIteratorStreamer

    class StepStreamer(TextIteratorStreamer):
        """A TextIteratorStreamer that also feeds each generated token to a LiveGeneration and queues what
        `on_step` returns after the token's text."""

        def __init__(
            self, tokenizer: Any, live: LiveGeneration, on_step: Callable[[LiveGeneration], Iterable[Any]]
        ) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.live = live
            self.on_step = on_step

        def put(self, value: torch.Tensor) -> None:
            prompt = self.next_tokens_are_prompt
            super().put(value)  # the text chunk first (it may hold back a word's end until the next space)
            if prompt:
                return
            self.live.extend((value[0] if value.dim() > 1 else value).tolist())
            for item in self.on_step(self.live):
                self.text_queue.put(item, timeout=self.timeout)

    return StepStreamer


def _step_streamer(tokenizer: Any, live: LiveGeneration, on_step: Callable[[LiveGeneration], Iterable[Any]]) -> Any:
    """The streamer of `ModelRunner.stream(on_step=...)` (transformers is imported only when a stream starts)."""
    return _step_streamer_class()(tokenizer, live, on_step)


def _stop_strings_criteria(
    tokenizer: Any, stop_strings: Sequence[str], prompt_length: int, given: Iterable[Any] | None = None
) -> Any:
    """`given` stopping criteria and one more: a row is done once the text of its last generated tokens holds a
    stop string (a few tokens more than the longest stop string has characters, decoded each step)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    window = max(len(s) for s in stop_strings) + 4

    class StopStrings(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            done = [
                any(s in tokenizer.decode(row[-window:], skip_special_tokens=True) for s in stop_strings)
                for row in input_ids[:, prompt_length:].tolist()
            ]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([*(given or []), StopStrings()])


def _before_stop_string(tokenizer: Any, generated: list[int], stop_strings: Sequence[str]) -> tuple[int, int] | None:
    """Where the answer ends before the first stop string in its text (None: no stop string): the tokens to keep
    (up to the one holding the stop string's first character, when the text before it ends inside that token) and
    the characters to keep (exactly the text before the stop string)."""
    text = tokenizer.decode(generated, skip_special_tokens=True)
    found = [at for at in (text.find(s) for s in stop_strings if s) if at >= 0]
    if not found:
        return None
    cut = min(found)
    kept = 0
    while kept < len(generated) and len(tokenizer.decode(generated[: kept + 1], skip_special_tokens=True)) <= cut:
        kept += 1
    if kept < len(generated) and len(tokenizer.decode(generated[:kept], skip_special_tokens=True)) < cut:
        kept += 1  # the text before the stop string ends inside this token: keep it, cut its characters
    return kept, cut


def _kept(generated: list[int], control: RowControl | None, row: int) -> list[int]:
    """A row's tokens up to where its hooks stopped it (the rest of the batch's steps are padding for it)."""
    ended = control.ended_at[row] if control is not None else None
    return generated if ended is None else generated[:ended]


def _until_first_stop(generated: list[int], eos: frozenset[int]) -> list[int]:
    """A batch row's tokens up to and including its first end-of-sequence token (what a lone run would stop at);
    a row that never stopped ran to the token limit."""
    for i, token in enumerate(generated):
        if token in eos:
            return generated[: i + 1]
    return generated


def _prefix_length(prompt: RenderedPrompt) -> int:
    """Tokens before the prompt's first document (0 without documents): what every documents-free pass shares."""
    starts = [a for a, b in prompt.doc_token_spans if b > a]
    return min(starts) if starts else 0
