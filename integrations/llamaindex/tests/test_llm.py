"""AT2LLM over the real embedded model."""

from __future__ import annotations

import pytest
from llama_index.core.llms import ChatMessage, MessageRole


@pytest.fixture(scope="module")
def llm(attributor):
    from llama_index.postprocessor.at2 import AT2LLM

    return AT2LLM(attributor, max_new_tokens=8)


def test_metadata_comes_from_the_model(llm, attributor):
    meta = llm.metadata
    assert meta.context_window == attributor.context_window == attributor.model.config.max_position_embeddings
    assert meta.num_output == 8
    assert meta.is_chat_model
    assert meta.model_name == attributor.model_id
    assert llm.attributor is attributor


def test_complete_and_stream_complete_agree(llm):
    prompt = "What is the capital of France? Answer in one word."
    full = llm.complete(prompt)
    assert full.text.strip()
    chunks = list(llm.stream_complete(prompt))
    assert chunks and "".join(c.delta for c in chunks) == chunks[-1].text
    assert chunks[-1].text == full.text  # greedy decoding: the stream is the same answer


def test_chat_uses_the_chat_template(llm):
    messages = [
        ChatMessage(role=MessageRole.SYSTEM, content="You answer with one word."),
        ChatMessage(role=MessageRole.USER, content="What colour is the sky on a clear day?"),
    ]
    prompt = llm._chat_prompt(messages)
    assert "You answer with one word." in prompt and prompt.rstrip().endswith("assistant")
    reply = llm.chat(messages)
    assert reply.message.role == MessageRole.ASSISTANT and reply.message.content.strip()


@pytest.mark.asyncio
async def test_acomplete(llm):
    out = await llm.acomplete("Say hello.", max_new_tokens=4)
    assert out.text.strip()
