"""Conversations: earlier turns, the system prompt and the question are sources too, scored like documents, and
each answer sentence says how much it depends on the documents at all (`grounded`)."""

from __future__ import annotations

from at2_rag import Attributor

DOCS = [
    "Employees get 25 vacation days per year. Vacation days are approved by your manager.",
    "Unused vacation days cannot be carried over to the next year.",
    "The office is open from 8am to 6pm.",
]
FIRST_QUESTION = "How many vacation days do I get per year?"
EARLIER_ANSWER = "You get 25 vacation days per year, approved by your manager."


def history():
    return [{"role": "user", "content": FIRST_QUESTION}, {"role": "assistant", "content": EARLIER_ANSWER}]


def test_context_sources_are_every_turn_the_system_prompt_and_the_question(att):
    result = att.attribute("Can unused days be carried over?", DOCS, answer="No, they cannot.", history=history())
    assert [c.key for c in result.context_sources] == ["system", "history:0", "history:1", "query"]
    assert set(result.context_scores()) == {"system", "history:0", "history:1", "query"}
    by_key = {c.key: c for c in result.context_sources}
    assert by_key["history:1"].role == "assistant" and by_key["history:1"].text == EARLIER_ANSWER
    assert by_key["query"].text == "Can unused days be carried over?"
    # each context part's token span decodes to exactly its text (spans from offsets)
    prompt = att.render("Can unused days be carried over?", DOCS, history=history())
    for part, (a, b) in zip(prompt.context_parts, prompt.context_token_spans):
        assert att.tokenizer.decode(prompt.input_ids[a:b]).strip() == part.text.strip()
        assert prompt.text[part.start : part.end] == part.text
    # documents and context parts never share a token
    spans = sorted(prompt.doc_token_spans + prompt.context_token_spans)
    assert all(b0 <= a1 for (_, b0), (a1, _) in zip(spans, spans[1:]))


def test_a_follow_up_that_repeats_the_earlier_answer_is_attributed_to_that_turn(att):
    result = att.attribute("Can unused vacation days be carried over?", DOCS, answer=EARLIER_ANSWER, history=history())
    scores = result.context_scores()
    assert scores["history:1"] > max(result.document_scores().values())
    (citation,) = result.citations
    assert citation.context and citation.context[0].key == "history:1"
    assert all(c.kind != "query" for c in citation.context)


def test_a_sentence_answered_without_the_documents_is_not_supported(att):
    result = att.attribute(
        "What is the official language of Peru?", DOCS, answer="The official language of Peru is Spanish."
    )
    (citation,) = result.citations
    assert not citation.supported and citation.cited == [] and not result.supported
    assert citation.grounded < att.scorer.groundedness(refined=False).threshold
    grounded = att.attribute("How many vacation days?", DOCS, answer="Employees get 25 vacation days per year.")
    assert grounded.citations[0].supported and grounded.citations[0].cited[0] == "doc0"
    assert grounded.citations[0].grounded > citation.grounded
    # the threshold is the caller's to set
    strict = Attributor(att.model, att.tokenizer, grounded_threshold=1e6)
    assert not strict.attribute(
        "How many vacation days?", DOCS, answer="Employees get 25 vacation days per year."
    ).supported


def test_context_sources_through_attribute_rendered(att):
    messages = [
        {"role": "system", "content": "Answer from the documents."},
        {"role": "user", "content": FIRST_QUESTION},
        {"role": "assistant", "content": EARLIER_ANSWER},
        {
            "role": "user",
            "content": "Documents:\n" + "\n\n".join(DOCS) + "\n\nQuestion: Can unused days be carried over?",
        },
    ]
    result = att.attribute_rendered(messages, DOCS, answer=EARLIER_ANSWER, query="Can unused days be carried over?")
    assert [c.key for c in result.context_sources] == ["system", "history:0", "history:1", "query"]
    assert result.context_sources[-1].text == "Can unused days be carried over?"
    assert result.context_scores()["history:1"] > max(result.document_scores().values())
    # a string prompt: only the question can be found (its turns are not known)
    text = att.locate(messages).text
    as_string = att.attribute_rendered(text, DOCS, answer="No.", query="Can unused days be carried over?")
    assert [c.key for c in as_string.context_sources] == ["query"]
    # a final user turn without documents is the question itself
    docs_in_system = [
        {"role": "system", "content": "Context:\n" + "\n".join(DOCS)},
        {"role": "user", "content": "Carry over?"},
    ]
    located = att.attribute_rendered(docs_in_system, DOCS, answer="No.")
    assert [(c.key, c.text) for c in located.context_sources] == [("query", "Carry over?")]


def test_collection_ablates_context_parts_and_removes_every_document_once(att):
    from at2_rag.training.collect import collect_example
    from at2_rag.training.data import Example

    example = Example(
        id="conv-1",
        query="Can unused days be carried over?",
        documents=att.render("x", DOCS).documents,
        history=history(),
    )
    item = collect_example(att, example, num_masks=3, sources="context", max_new_tokens=8)
    assert item is not None
    assert item.meta["source_ids"] == ["doc0", "doc1", "doc2", "system", "history:0", "history:1", "query"]
    assert item.features.shape[1] == 7 and item.masks.shape == (4, 7)
    last = item.meta["no_documents_mask"]
    assert last == 3 and item.masks[last].tolist() == [False] * 3 + [True] * 4
    assert item.labels.shape == (item.features.shape[0], 4)


def test_groundedness_fit_and_auroc_on_known_data():
    import torch

    from at2_rag.grounding import GroundednessCalibration, auroc, fit_groundedness

    docs = torch.tensor([0.0, 0.01, 0.02, 0.03, 0.04], dtype=torch.double)
    hist = torch.tensor([0.02, 0.0, 0.01, 0.0, 0.03], dtype=torch.double)
    drops = 300 * docs - 100 * hist + 0.5
    scale, offset, history_scale = fit_groundedness(docs, drops, hist)
    assert (round(scale), round(offset, 6), round(history_scale)) == (300, 0.5, -100)
    assert fit_groundedness(docs, 300 * docs + 0.5)[2] == 0.0
    calibration = GroundednessCalibration.from_metadata(
        {"groundedness": {"scale": scale, "offset": offset, "history_scale": history_scale}}, fallback_scale=1.0
    )
    assert calibration.calibrated and abs(calibration.grounded([0.02, 0.02], [0.01]) - (300 * 0.04 - 1 + 0.5)) < 1e-9
    assert GroundednessCalibration.from_metadata({}, fallback_scale=7.0).scale == 7.0
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([False, False, True, True])) == 0.75
