"""LlamaIndex's hidden downloads (OpenAI defaults, tiktoken encodings, NLTK data) are not used or not needed."""

from __future__ import annotations

from pathlib import Path


def test_settings_point_at_local_components(local_settings):
    import llama_index.core
    from llama_index.core import Settings

    from examples.llamaindex_rag import MiniLMEmbedding
    from llama_index.postprocessor.at2 import AT2LLM

    assert isinstance(Settings.llm, AT2LLM)
    assert isinstance(Settings.embed_model, MiniLMEmbedding)
    tok = Settings.tokenizer
    assert getattr(tok, "func", None) == local_settings.tokenizer.encode  # the HF tokenizer, not tiktoken
    assert llama_index.core.global_tokenizer is tok
    assert tok("Paris is the capital of France.") == local_settings.tokenizer.encode(
        "Paris is the capital of France.", add_special_tokens=False
    )


def test_nltk_data_comes_from_llama_index_bundle():
    """llama-index-core's sentence splitting (punkt_tab) and stopwords come from the NLTK data it ships in
    `_static/nltk_cache`: both are found there, so `wait_for_nltk_check` never calls nltk.download (and with
    sockets disabled, a download attempt would fail)."""
    import nltk
    from llama_index.core.utils import globals_helper

    assert "the" in globals_helper.stopwords
    assert globals_helper.punkt_tokenizer.tokenize("Paris is in France. It is large.") == [
        "Paris is in France.",
        "It is large.",
    ]
    data_dir = globals_helper._nltk_data_dir
    assert data_dir is not None and "_static/nltk_cache" in data_dir.replace("\\", "/")
    assert Path(nltk.data.find("tokenizers/punkt_tab", paths=[data_dir])).exists()
    assert Path(nltk.data.find("corpora/stopwords", paths=[data_dir])).exists()


def test_stable_node_ids(nodes):
    ids = [n.node_id for n in nodes]
    assert len(ids) == len(set(ids)) == 16
    assert "penicillin-0" in ids
