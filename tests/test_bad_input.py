"""Bad input fails with the right error and a clear message; the public results hold together (real SmolLM2)."""

from __future__ import annotations

import json

import pytest
import torch

from at2_rag import (
    Attribution,
    Attributor,
    ContextTooLongError,
    Document,
    InvalidInputError,
    NoDocumentsError,
    ScoreEstimator,
)
from at2_rag.capture.features import target_features
from at2_rag.errors import EstimatorFormatError, EstimatorMismatchError

QUERY = "When was the Eiffel Tower finished?"
DOCS = [
    Document(text="The Eiffel Tower is in Paris. It was finished in 1889.", id="eiffel", title="Eiffel Tower"),
    Document(text="Mount Fuji is the highest mountain in Japan.", id="fuji", title="Mount Fuji"),
    Document(text="Bananas are yellow when ripe. They grow in bunches.", id="banana", title="Bananas"),
]
MAX_NEW = 20


@pytest.fixture(scope="module")
def attributor(smollm):
    model, tokenizer = smollm
    return Attributor(model, tokenizer)


@pytest.fixture(scope="module")
def generated_run(attributor):
    """One generation (what `Attributor.generate` does, keeping the run for feature-level checks)."""
    run = attributor.run(attributor.prepare({"query": QUERY, "documents": DOCS}, max_new_tokens=MAX_NEW))
    return run, attributor.score(run, attributor.gather_evidence(run))


@pytest.fixture(scope="module")
def generated(generated_run):
    return generated_run[1]


# ---- bad input --------------------------------------------------------------------------------------------------
def test_no_documents(attributor):
    with pytest.raises(NoDocumentsError, match="at least one document"):
        attributor.generate(QUERY, [], max_new_tokens=2)
    with pytest.raises(NoDocumentsError):
        attributor.attribute(QUERY, [], answer="1889")


@pytest.mark.parametrize("query", ["", "   \n"])
def test_empty_query(attributor, query):
    with pytest.raises(InvalidInputError, match="query"):
        attributor.generate(query, DOCS, max_new_tokens=2)


def test_empty_answer(attributor):
    for answer in ("", "  "):
        with pytest.raises(InvalidInputError, match="answer"):
            attributor.attribute(QUERY, DOCS, answer=answer)


def test_duplicate_document_ids_follow_the_one_policy(attributor):
    """Same id and text: one document; same id, other text: every chunk kept, the later one renamed `id#2`."""
    docs = [Document(text="Paris is in France.", id="same"), Document(text="Paris is in France.", id="same"),
            Document(text="Lyon is in France.", id="same")]
    result = attributor.attribute(QUERY, docs, answer="In France.")
    assert [d.id for d in result.documents] == ["same", "same#2"]
    assert [d.text for d in result.documents] == ["Paris is in France.", "Lyon is in France."]


@pytest.mark.parametrize(
    "bad",
    [42, None, b"bytes", ["a list"], {"text": 42}, {"title": "no text"}, {"text": "ok", "id": 7}],
    ids=["int", "none", "bytes", "list", "mapping-int-text", "mapping-no-text", "mapping-int-id"],
)
def test_non_string_document(attributor, bad):
    with pytest.raises(InvalidInputError, match="document 1"):
        attributor.generate(QUERY, [DOCS[0], bad], max_new_tokens=2)


def test_documents_not_a_list(attributor):
    with pytest.raises(InvalidInputError):
        attributor.generate(QUERY, "just one string", max_new_tokens=2)


def test_plain_strings_and_mappings_are_documents(attributor):
    prompt = attributor.render(QUERY, ["plain text doc", {"page_content": "langchain style", "id": "lc"}])
    assert [d.id for d in prompt.documents] == ["doc0", "lc"]


def test_context_too_long_with_the_real_window(attributor):
    assert attributor.context_window == 8192
    long_doc = Document(text="tower " * 8300, id="long")
    with pytest.raises(ContextTooLongError) as info:
        attributor.generate(QUERY, [long_doc], max_new_tokens=4)
    err = info.value
    assert err.limit == 8192 and err.needed > 8192
    assert f"({err.needed - 8192} too many)" in str(err)
    assert f"needs {err.needed} tokens" in str(err)


def test_context_too_long_counts_the_overflow(smollm, clone_model):
    model, tokenizer = smollm
    small = clone_model(model)
    small.config.max_position_embeddings = 100
    attributor = Attributor(small, tokenizer)
    assert attributor.context_window == 100
    prompt_tokens = attributor.render(QUERY, DOCS).num_tokens
    assert prompt_tokens > 100
    with pytest.raises(ContextTooLongError, match=rf"\({prompt_tokens - 100} too many\)"):
        attributor.generate(QUERY, DOCS, max_new_tokens=4)

    # the prompt fits but prompt + max_new_tokens does not
    attributor.model.config.max_position_embeddings = prompt_tokens + 5
    with pytest.raises(ContextTooLongError, match=r"\(5 too many\)") as info:
        attributor.generate(QUERY, DOCS, max_new_tokens=10)
    assert "max_new_tokens=10" in str(info.value)

    # prompt + answer in attribute()
    answer = "It was finished in 1889, in Paris, France."
    n_answer = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
    attributor.model.config.max_position_embeddings = prompt_tokens + n_answer - 3
    with pytest.raises(ContextTooLongError, match=r"\(3 too many\)"):
        attributor.attribute(QUERY, DOCS, answer=answer)


def test_max_new_tokens_below_one(attributor):
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        attributor.generate(QUERY, DOCS, max_new_tokens=0)


# ---- estimator mismatch and format -------------------------------------------------------------------------------
@pytest.mark.parametrize("layers, heads", [(29, 9), (30, 8), (1, 270)])
def test_estimator_with_wrong_grid(smollm, layers, heads):
    model, tokenizer = smollm
    with pytest.raises(EstimatorMismatchError, match=f"{layers} layers x {heads} heads"):
        Attributor(model, tokenizer, estimator=ScoreEstimator.uniform(layers, heads))


def test_estimator_for_another_model(smollm):
    model, tokenizer = smollm
    other = ScoreEstimator.uniform(30, 9, model_id="someone/other-model-135M")
    with pytest.raises(EstimatorMismatchError, match="check_model_id=False"):
        Attributor(model, tokenizer, estimator=other)
    accepted = Attributor(model, tokenizer, estimator=other, check_model_id=False)
    assert accepted.estimator is other
    # a differently spelled id of the same model is the same model
    same = ScoreEstimator.uniform(30, 9, model_id="smollm2-135m-instruct")
    Attributor(model, tokenizer, estimator=same)
    # check_model_id=False never excuses a wrong grid
    with pytest.raises(EstimatorMismatchError):
        Attributor(model, tokenizer, estimator=ScoreEstimator.uniform(30, 8, model_id="x/y"), check_model_id=False)


def test_estimator_constructors():
    w = torch.arange(6, dtype=torch.float32)
    est = ScoreEstimator(w, num_layers=2, num_heads=3, model_id="m/x")
    assert est.head_weights().shape == (2, 3)
    assert torch.equal(est.head_weights()[1], torch.tensor([3.0, 4.0, 5.0]))
    assert est.trained
    with pytest.raises(EstimatorFormatError, match="2 x 4"):
        ScoreEstimator(w, num_layers=2, num_heads=4)
    with pytest.raises(EstimatorFormatError):
        ScoreEstimator([float("nan")] * 6, num_layers=2, num_heads=3)
    with pytest.raises(EstimatorMismatchError):
        est(torch.zeros(4, 5))

    single = ScoreEstimator.single_head(1, 2, num_layers=2, num_heads=3)
    assert single.weights.tolist() == [0, 0, 0, 0, 0, 1.0]
    assert not single.trained
    with pytest.raises(EstimatorFormatError):
        ScoreEstimator.single_head(2, 0, num_layers=2, num_heads=3)

    uniform = ScoreEstimator.uniform(2, 3)
    assert torch.allclose(uniform.weights.sum(), torch.tensor(1.0))


def test_estimator_save_load_round_trip(tmp_path):
    est = ScoreEstimator(
        torch.randn(30 * 9),
        num_layers=30,
        num_heads=9,
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        metadata={"num_examples": 12, "epochs": 2},
    )
    folder = est.save_pretrained(tmp_path / "est")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["num_layers"] == 30 and config["num_heads"] == 9
    assert config["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "SmolLM2" in (folder / "README.md").read_text()
    assert folder.stat().st_mode & 0o777 == 0o755  # shareable, not mkdtemp's 0700
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}
    loaded = ScoreEstimator.from_pretrained(folder)
    assert torch.equal(loaded.weights, est.weights)
    assert (loaded.num_layers, loaded.num_heads, loaded.model_id) == (30, 9, est.model_id)
    assert loaded.metadata == est.metadata and loaded.trained
    # saving again over the folder replaces it
    est2 = ScoreEstimator.uniform(30, 9)
    est2.save_pretrained(folder)
    assert torch.equal(ScoreEstimator.from_pretrained(str(folder)).weights, est2.weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["est"]


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "both"])
def test_estimator_folder_missing_files(tmp_path, missing):
    folder = ScoreEstimator.uniform(2, 3).save_pretrained(tmp_path / "est")
    for name in (["config.json", "model.safetensors"] if missing == "both" else [missing]):
        (folder / name).unlink()
    with pytest.raises(EstimatorFormatError):
        ScoreEstimator.from_pretrained(folder)


def test_estimator_folder_corrupt_files(tmp_path):
    folder = ScoreEstimator.uniform(2, 3).save_pretrained(tmp_path / "est")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(EstimatorFormatError):
        ScoreEstimator.from_pretrained(folder)
    folder = ScoreEstimator.uniform(2, 3).save_pretrained(tmp_path / "est2")
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(EstimatorFormatError):
        ScoreEstimator.from_pretrained(folder)
    folder = ScoreEstimator.uniform(2, 3).save_pretrained(tmp_path / "est3")
    config = json.loads((folder / "config.json").read_text())
    del config["num_heads"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(EstimatorFormatError, match="num_heads"):
        ScoreEstimator.from_pretrained(folder)


# ---- results --------------------------------------------------------------------------------------------------
def test_generation_stopped_by_length(attributor):
    result = attributor.generate(QUERY, DOCS, max_new_tokens=3)
    assert result.finish_reason == "length"
    assert result.num_answer_tokens == 3
    assert result.answer.strip()
    assert set(result.document_scores()) == {"eiffel", "fuji", "banana"}
    assert result.citations and all(c.documents for c in result.citations)
    for c in result.citations:
        assert result.answer[c.start : c.end] == c.text


def test_generate_is_generate_run_plus_build(attributor, generated):
    again = attributor.generate(QUERY, DOCS, max_new_tokens=MAX_NEW)
    assert again.answer == generated.answer
    assert again.document_scores() == pytest.approx(generated.document_scores(), abs=1e-6)


def test_attribute_equals_generate(attributor, generated_run):
    tokenizer = attributor.tokenizer
    run, generated = generated_run
    assert run.answer.text == generated.answer
    re_encoded = tokenizer(generated.answer, add_special_tokens=False)["input_ids"]
    assert re_encoded == run.answer.token_ids, "the answer does not re-tokenize to the generated tokens"
    again = attributor.attribute(QUERY, DOCS, answer=generated.answer)
    assert again.answer == generated.answer
    assert again.finish_reason is None
    gen_scores, fwd_scores = generated.document_scores(), again.document_scores()
    assert gen_scores.keys() == fwd_scores.keys()
    for doc_id in gen_scores:
        assert abs(gen_scores[doc_id] - fwd_scores[doc_id]) < 1e-4, (doc_id, gen_scores, fwd_scores)
    for d1, d2 in zip(generated.documents, again.documents):
        for s1, s2 in zip(d1.sentences, d2.sentences):
            assert abs(s1.score - s2.score) < 1e-4
    assert [c.text for c in again.citations] == [c.text for c in generated.citations]
    # the features themselves agree row by row
    fwd = attributor.run(attributor.prepare({"query": QUERY, "documents": DOCS, "answer": generated.answer}))
    assert (fwd.token_features - run.token_features).abs().max().item() < 1e-4


def test_result_accessors(generated):
    r = generated
    assert isinstance(r, Attribution)
    assert r.query == QUERY
    assert r.answer.strip()
    assert r.finish_reason in ("stop", "length")
    assert 0 < r.num_answer_tokens <= MAX_NEW
    scores = r.document_scores()
    assert list(scores) == ["eiffel", "fuji", "banana"]
    assert all(isinstance(v, float) for v in scores.values())
    for k in (1, 2, 3, 5):
        top = r.top_documents(k)
        assert len(top) == min(k, 3)
        assert [d.score for d in top] == sorted(scores.values(), reverse=True)[: len(top)]
    assert r.top_documents(3)[0].id == max(scores, key=scores.get)
    assert r.document("fuji").title == "Mount Fuji"
    with pytest.raises(KeyError):
        r.document("nope")
    for d, doc in zip(r.documents, DOCS):
        assert d.text == doc.text and d.num_tokens > 0
        for s in d.sentences:
            assert d.text[s.start : s.end] == s.text
    assert [s.text for s in r.document("eiffel").sentences] == [
        "The Eiffel Tower is in Paris.",
        "It was finished in 1889.",
    ]


def test_citations_index_answer_and_documents(generated):
    r = generated
    assert r.citations
    texts = {d.id: d.text for d in DOCS}
    last = 0
    for c in r.citations:
        assert r.answer[c.start : c.end] == c.text
        assert c.start >= last
        last = c.end
        assert sorted(d.id for d in c.documents) == sorted(texts)
        assert [d.score for d in c.documents] == sorted((d.score for d in c.documents), reverse=True)
        assert set(c.cited) <= set(texts) and c.supported == bool(c.cited)
        for cd in c.documents:
            for s in cd.sentences:
                assert texts[cd.id][s.start : s.end] == s.text
    marked = r.cited_answer()
    for c in r.citations:
        assert c.text in marked


def test_views(generated, tmp_path):
    import html

    r = generated
    page = r._repr_html_()
    assert html.escape(r.answer.strip()) in page or all(html.escape(c.text) in page for c in r.citations)
    for doc in DOCS:
        assert doc.title in page
    text = r.to_text()
    assert text.startswith(f"Q: {QUERY}")
    for doc in DOCS:
        assert doc.title in text
    assert str(r) == text
    path = r.plot(tmp_path / "x.png")
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(r.to_json())["answer"] == r.answer


def test_stream(attributor):
    items = list(attributor.stream(QUERY, DOCS, max_new_tokens=12))
    *chunks, final = items
    assert chunks and all(isinstance(c, str) for c in chunks)
    assert isinstance(final, Attribution)
    assert "".join(chunks).strip() == final.answer.strip()
    assert set(final.document_scores()) == {"eiffel", "fuji", "banana"}


def test_stream_bad_input_fails_before_any_chunk(attributor):
    with pytest.raises(NoDocumentsError):
        next(iter(attributor.stream(QUERY, [], max_new_tokens=4)))


def test_history_and_system_prompt_in_prompt(attributor):
    history = [
        {"role": "user", "content": "Hi, I am planning a trip to France."},
        ("assistant", "Great, how can I help with your trip?"),
    ]
    r = attributor.generate(QUERY, DOCS, history=history, system_prompt="Answer like a pirate.", max_new_tokens=4)
    assert "Hi, I am planning a trip to France." in r.prompt
    assert "Great, how can I help with your trip?" in r.prompt
    assert "Answer like a pirate." in r.prompt
    assert r.prompt.index("planning a trip") < r.prompt.index("Bananas are yellow")
    r2 = attributor.attribute(QUERY, DOCS, answer="In 1889.", system_prompt=None)
    assert "You are a helpful assistant. Answer the question" not in r2.prompt


def test_single_head_estimator_reads_one_head(smollm):
    model, tokenizer = smollm
    layer, head = 12, 4
    est = ScoreEstimator.single_head(layer, head, num_layers=30, num_heads=9)
    attributor = Attributor(model, tokenizer, estimator=est)
    answer = "It was finished in 1889."
    run = attributor.run(attributor.prepare(
        {"query": QUERY, "documents": DOCS, "answer": answer}
    ))  # what attribute() does, keeping the features
    result = attributor.score(run, attributor.gather_evidence(run))
    rows = [i for i, (a, b) in enumerate(run.answer.char_spans) if b > a]
    expected = target_features(run.token_features, rows)[: len(DOCS), layer * 9 + head]
    got = torch.tensor([d.score for d in result.documents])
    assert torch.allclose(got, expected, atol=1e-6)
    # attention weights: each document's share lies in [0, 1] and all of them sum to at most 1
    assert (got >= 0).all() and got.sum() <= 1 + 1e-5
