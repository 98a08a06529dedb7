"""MiniLMEmbedding (examples/llamaindex_rag.py): the packaged all-MiniLM-L6-v2, offline, in a real VectorStoreIndex."""

from __future__ import annotations

import math


def test_embedding_shape_and_norm(local_settings):
    from examples.llamaindex_rag import MiniLMEmbedding

    emb = MiniLMEmbedding()
    vec = emb.get_text_embedding("The blue whale is the largest animal.")
    assert len(vec) == 384 == emb.dimension
    assert math.isclose(sum(v * v for v in vec), 1.0, rel_tol=1e-4)
    q = emb.get_query_embedding("largest animal ever")
    batch = emb.get_text_embedding_batch(["The blue whale is the largest animal.", "Coffee comes from Ethiopia."])
    sims = [sum(a * b for a, b in zip(q, d)) for d in batch]
    assert sims[0] > sims[1]


def test_vector_index_retrieves_the_right_node(vector_index):
    hits = vector_index.as_retriever(similarity_top_k=3).retrieve("Who discovered penicillin?")
    assert hits[0].node.node_id == "penicillin-0"
    assert hits[0].score > hits[1].score
