"""LangChain's standard integration tests for chat models, on the real embedded SmolLM2-135M-Instruct.

Features a 135M local model does not have are switched off through the documented properties: tool calling,
structured output, JSON mode, image/audio/PDF/video inputs. A per-call model override is supported and tested:
the override is the embedded model's converted checkpoint folder, loaded as a second, separate model (no other
causal LM is available offline). Generations are kept short (max_tokens=12) for CPU time.
"""

from __future__ import annotations

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_at2 import ChatAT2


@pytest.mark.slow
class TestChatAT2Integration(ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _model_loaded_once(self, attributor) -> None:  # the session fixture: weights load once
        return None

    @property
    def chat_model_class(self) -> type[ChatAT2]:
        return ChatAT2

    @property
    def chat_model_params(self) -> dict:
        return {"max_tokens": 12}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def supports_anthropic_inputs(self) -> bool:
        return False

    @property
    def supports_image_tool_message(self) -> bool:
        return False

    @property
    def supports_pdf_tool_message(self) -> bool:
        return False

    @property
    def supports_model_override(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str:
        from at2_rag.models import default_model_path

        return str(default_model_path())  # a local folder: `model=` loads it with Attributor.from_pretrained

    @property
    def returns_usage_metadata(self) -> bool:
        return True
