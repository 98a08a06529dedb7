from __future__ import annotations

import langchain_at2
from langchain_at2 import __all__

EXPECTED = {
    "AT2CallbackHandler",
    "AT2Citations",
    "AsyncAT2CallbackHandler",
    "ChainAttribution",
    "ChatAT2",
    "__version__",
    "attribution_from_metadata",
    "document_blocks",
    "documents_message",
    "extract_documents",
    "rag_messages",
    "to_at2_document",
    "to_at2_documents",
    "with_citations",
}


def test_all_imports() -> None:
    assert set(__all__) == EXPECTED
    for name in __all__:
        assert hasattr(langchain_at2, name)


def test_constructing_models_loads_nothing() -> None:
    from at2_rag.serving import shared
    from langchain_at2._loading import get_attributor

    assert get_attributor is shared.get_attributor  # one shared Attributor per process, the core's
    before = dict(shared._CACHE)
    for _ in range(50):
        langchain_at2.ChatAT2(max_tokens=8)
        langchain_at2.AT2CallbackHandler()
        langchain_at2.AT2Citations()
    assert shared._CACHE == before


def test_field_aliases_and_params() -> None:
    model = langchain_at2.ChatAT2(model="some/local-folder", max_tokens=7, stop_sequences=["END"], temperature=0.3)
    assert (model.model_name, model.max_new_tokens, model.stop) == ("some/local-folder", 7, ["END"])
    assert langchain_at2.ChatAT2(max_new_tokens=9).max_new_tokens == 9
    params = model._get_ls_params(stop=["x"])
    assert params["ls_provider"] == "at2" and params["ls_model_name"] == "some/local-folder"
    assert params["ls_max_tokens"] == 7 and params["ls_stop"] == ["x"] and params["ls_temperature"] == 0.3
    assert model._identifying_params["model_name"] == "some/local-folder"
    assert langchain_at2.ChatAT2()._identifying_params["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model._llm_type == "chat-at2"
