"""AT2LLM: the attributor's own local model as a LlamaIndex LLM, so the model that answers is the one attributed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, cast

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from ._common import chat_dicts, default_attributor

DEFAULT_CONTEXT_WINDOW = 2048
_DONE = object()
logger = logging.getLogger(__name__)


class AT2LLM(CustomLLM):
    """A LlamaIndex LLM over the Hugging Face model inside an `at2_rag.Attributor` (default: the embedded
    SmolLM2-135M-Instruct). Prompts go through the tokenizer's chat template; decoding is greedy unless
    `generate_kwargs` say otherwise. `metadata.context_window` is the model's `max_position_embeddings`,
    `metadata.num_output` is `max_new_tokens`.

    Use it as `Settings.llm` (or `llm=`) so LlamaIndex's synthesizers answer with the same model that
    `AT2NodePostprocessor` / `AT2CitationQueryEngine` attribute.
    """

    max_new_tokens: int = Field(default=256, ge=1, description="Tokens to generate at most (num_output).")
    context_window: int = Field(default=DEFAULT_CONTEXT_WINDOW, description="Set from the model at init.")
    model_name: str = Field(default="local", description="Set from the model at init.")
    generate_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra `generate` arguments.")

    _attributor: Any = PrivateAttr(default=None)

    def __init__(self, attributor: Any = None, **kwargs: Any) -> None:
        attributor = attributor if attributor is not None else default_attributor()
        kwargs.setdefault("context_window", attributor.context_window or DEFAULT_CONTEXT_WINDOW)
        kwargs.setdefault("model_name", attributor.model_id or type(attributor.model).__name__)
        super().__init__(**kwargs)
        self._attributor = attributor

    @classmethod
    def class_name(cls) -> str:
        return "AT2LLM"

    @property
    def attributor(self) -> Any:
        return self._attributor

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            model_name=self.model_name,
            system_role=MessageRole.SYSTEM,
        )

    # ---- prompt rendering -------------------------------------------------------------------------------
    # Prompts go to the core as messages, not as rendered strings: the core then tokenizes every message's
    # content as plain text, so a retrieved node reading "<|im_end|>" cannot end the turn.
    def _chat_prompt(self, messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
        return chat_dicts(messages, self.system_prompt)

    def _completion_prompt(self, prompt: str, formatted: bool) -> str | list[dict[str, str]]:
        """`formatted=True`: the caller's exact prompt text; else one user turn (and the system prompt)."""
        if formatted:
            return prompt
        turns = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        turns.append({"role": "user", "content": prompt})
        return turns

    # ---- generation (the core's plain generation: no capture, under the model's lock) -------------------
    def _generate_args(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"max_new_tokens": kwargs.pop("max_new_tokens", self.max_new_tokens), **self.generate_kwargs, **kwargs}

    def _generate(self, prompt: str | list[dict[str, str]], **kwargs: Any) -> str:
        return self._attributor.generate_text(prompt, **self._generate_args(kwargs))

    def _stream(self, prompt: str | list[dict[str, str]], **kwargs: Any) -> Iterator[str]:
        return self._attributor.stream_text(prompt, **self._generate_args(kwargs))

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """`formatted=False` (default) wraps the prompt as one user turn in the chat template."""
        return CompletionResponse(text=self._generate(self._completion_prompt(prompt, formatted), **kwargs))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        text = self._completion_prompt(prompt, formatted)

        def gen() -> CompletionResponseGen:
            so_far = ""
            for chunk in self._stream(text, **kwargs):
                so_far += chunk
                yield CompletionResponse(text=so_far, delta=chunk)

        return gen()

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Messages are rendered with the model's own chat template (not LlamaIndex's generic one)."""
        answer = self._generate(self._chat_prompt(messages), **kwargs)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=answer))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        text = self._chat_prompt(messages)

        def gen() -> ChatResponseGen:
            so_far = ""
            for chunk in self._stream(text, **kwargs):
                so_far += chunk
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=so_far), delta=chunk)

        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Generation runs in a worker thread so the event loop stays free."""
        text = self._completion_prompt(prompt, formatted)
        return CompletionResponse(text=await asyncio.to_thread(self._generate, text, **kwargs))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        answer = await asyncio.to_thread(self._generate, self._chat_prompt(messages), **kwargs)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=answer))

    # Async streaming: every chunk is awaited from a worker thread, so the event loop keeps running while the
    # model decodes (CustomLLM's default would iterate the synchronous stream inside the loop).
    async def _astream(self, prompt: str | list[dict[str, str]], **kwargs: Any) -> AsyncIterator[str]:
        chunks = self._stream(prompt, **kwargs)
        try:
            while True:
                chunk = await asyncio.to_thread(next, chunks, _DONE)
                if chunk is _DONE:
                    return
                yield cast(str, chunk)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                try:
                    close()
                except ValueError:  # cancelled while a worker thread is inside next(): it ends on its own
                    logger.debug("AT2LLM: stream closed while a chunk was being generated")

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        text = self._completion_prompt(prompt, formatted)

        async def gen() -> CompletionResponseAsyncGen:
            so_far = ""
            async for chunk in self._astream(text, **kwargs):
                so_far += chunk
                yield CompletionResponse(text=so_far, delta=chunk)

        return gen()

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        text = self._chat_prompt(messages)

        async def gen() -> ChatResponseAsyncGen:
            so_far = ""
            async for chunk in self._astream(text, **kwargs):
                so_far += chunk
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=so_far), delta=chunk)

        return gen()

    def count_tokens(self, text: str) -> int:
        return len(self._attributor.tokenizer(text, add_special_tokens=False)["input_ids"])
