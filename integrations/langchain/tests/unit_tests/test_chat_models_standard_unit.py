"""LangChain's standard unit tests for chat models (no weights are loaded: ChatAT2 loads lazily)."""

from __future__ import annotations

from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_at2 import ChatAT2


class TestChatAT2Unit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatAT2]:
        return ChatAT2

    @property
    def chat_model_params(self) -> dict:
        return {"model": "HuggingFaceTB/SmolLM2-135M-Instruct"}

    # supports_model_override: True (the default): a per-call `model=` picks another shared Attributor, and
    # `_get_ls_params(model=...)` reports it (test_standard_params_model_override)
