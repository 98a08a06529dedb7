"""Packaging, namespace layout and option validation (no model calls)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def test_namespace_import_alongside_core():
    import llama_index
    import llama_index.core
    import llama_index.retrievers.bm25  # another installed integration package shares the namespace

    import llama_index.postprocessor.at2 as at2

    assert Path(at2.__file__).resolve().is_relative_to(PACKAGE_ROOT)
    # PEP 420 namespace packages: no __init__.py in llama_index/ or llama_index/postprocessor/
    assert not (PACKAGE_ROOT / "llama_index" / "__init__.py").exists()
    assert not (PACKAGE_ROOT / "llama_index" / "postprocessor" / "__init__.py").exists()
    assert len(list(llama_index.__path__)) >= 2
    assert llama_index.core.__file__ and llama_index.retrievers.bm25.__file__


def test_public_classes_subclass_llama_index_bases():
    from llama_index.core.base.base_query_engine import BaseQueryEngine
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from llama_index.core.llms.custom import CustomLLM
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.query_engine import CustomQueryEngine

    from examples.llamaindex_rag import MiniLMEmbedding
    from llama_index.postprocessor.at2 import AT2LLM, AT2CitationQueryEngine, AT2NodePostprocessor

    assert issubclass(AT2NodePostprocessor, BaseNodePostprocessor)
    assert issubclass(AT2CitationQueryEngine, CustomQueryEngine)
    assert issubclass(AT2CitationQueryEngine, BaseQueryEngine)
    assert issubclass(AT2LLM, CustomLLM)
    assert issubclass(MiniLMEmbedding, BaseEmbedding)


def test_options_are_validated():
    from pydantic import ValidationError

    from llama_index.postprocessor.at2 import AT2NodePostprocessor

    with pytest.raises(ValidationError):
        AT2NodePostprocessor(mode="prune")
    with pytest.raises(ValidationError):
        AT2NodePostprocessor(top_k=0)
    with pytest.raises(ValidationError):
        AT2NodePostprocessor(relative_threshold=1.5)
    pp = AT2NodePostprocessor(mode="filter", top_k=2)
    assert pp.class_name() == "AT2NodePostprocessor"
    assert pp.to_dict()["top_k"] == 2  # serialises like other LlamaIndex components


def test_postprocessor_needs_a_query_and_accepts_no_nodes():
    from llama_index.core.schema import NodeWithScore, TextNode

    from llama_index.postprocessor.at2 import AT2NodePostprocessor

    pp = AT2NodePostprocessor()
    assert pp.postprocess_nodes([], query_str="anything") == []
    with pytest.raises(ValueError, match="query"):
        pp.postprocess_nodes([NodeWithScore(node=TextNode(text="x"), score=1.0)])


@pytest.mark.filterwarnings("ignore:A test tried to use socket")
def test_network_is_blocked_during_tests():
    """The suite runs with pytest-socket: a download attempt anywhere would fail loudly."""
    with pytest.raises(Exception, match="(?i)socket|network"):
        socket.create_connection(("203.0.113.1", 80), timeout=1)
