"""Conversations: earlier turns, the system prompt and the question are sources too, scored like documents, and
each answer sentence says how much it depends on the documents at all (`grounded`)."""

from __future__ import annotations

from pathlib import Path

import pytest

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

    from at2_rag.attribution.grounding import GroundednessCalibration, auroc, fit_groundedness

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


def test_groundedness_head_recovers_a_per_head_rule_and_refuses_bad_weights():
    """The learned head: ridge on summed per-head features recovers which heads say "reads the documents",
    and an estimator file whose head is malformed fails to load with a clear error."""
    import json

    import torch

    from at2_rag.attribution.estimator import ScoreEstimator
    from at2_rag.attribution.grounding import GroundednessCalibration, auroc, fit_groundedness_head
    from at2_rag.errors import EstimatorFormatError

    generator = torch.Generator().manual_seed(0)
    docs = torch.rand(400, 6, generator=generator, dtype=torch.double)
    hist = torch.rand(400, 6, generator=generator, dtype=torch.double)
    drops = 4 * docs[:, 2] - 3 * hist[:, 4] + 0.05 * torch.randn(400, generator=generator, dtype=torch.double)
    doc_w, hist_w, offset = fit_groundedness_head(docs, hist, drops, ridge=1e-3, cap=100.0)
    assert int(doc_w.abs().argmax()) == 2 and int(hist_w.abs().argmax()) == 4
    assert doc_w[2] == pytest.approx(4, rel=0.05) and hist_w[4] == pytest.approx(-3, rel=0.05)
    # capped targets: a few huge drops no longer decide the fit
    wild = drops.clone()
    wild[:5] = 80.0
    capped = fit_groundedness_head(docs, hist, wild, ridge=1e-3, cap=5.0)[0]
    assert (capped - doc_w).norm() < (fit_groundedness_head(docs, hist, wild, ridge=1e-3, cap=100.0)[0] - doc_w).norm()

    head = {"scale": 1.0, "document_weights": doc_w.tolist(), "history_weights": hist_w.tolist(), "head_offset": offset}
    calibration = GroundednessCalibration.from_metadata({"groundedness": head}, fallback_scale=1.0, num_features=6)
    predicted = torch.tensor([calibration.grounded([], [], d, h) for d, h in zip(docs, hist)], dtype=torch.double)
    assert auroc(predicted, drops >= 1.0) > 0.99
    # without features the head falls back to the scores' calibration (refined runs)
    assert calibration.grounded([0.5], [0.0]) == 0.5

    for bad, message in [
        (doc_w.tolist()[:5], "has 5 weights, the estimator has 6 heads"),
        (["x"] * 6, "list of finite numbers"),
        ([float("nan")] * 6, "list of finite numbers"),
        ("0.1", "list of finite numbers"),
    ]:
        with pytest.raises(EstimatorFormatError, match=message):
            GroundednessCalibration.from_metadata({"groundedness": dict(head, document_weights=bad)}, 1.0, 6)
    estimator = ScoreEstimator.uniform(2, 3)
    estimator.metadata["groundedness"] = dict(head, history_weights=hist_w.tolist()[:4])
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        estimator.save_pretrained(tmp + "/est")
        with pytest.raises(EstimatorFormatError, match="history_weights has 4 weights"):
            ScoreEstimator.from_folder(tmp + "/est")
        config = json.loads((Path(tmp) / "est" / "config.json").read_text())
        assert len(config["metadata"]["groundedness"]["document_weights"]) == 6


def test_grounded_is_the_shipped_head_on_the_sentence_features(att):
    """The shipped estimator has a head: a citation's `grounded` is that head applied to the sentence's
    features summed over the documents and the earlier turns, and refined runs use the surrogate instead."""
    from at2_rag.capture.features import target_features
    from at2_rag.prompting.answer import answer_targets

    calibration = att.scorer.groundedness(refined=False)
    assert calibration.document_weights is not None and calibration.history_weights is not None
    result = att.attribute(
        "Can unused vacation days be carried over?", DOCS, answer=EARLIER_ANSWER, history=history(),
        groundedness="estimated",
    )
    run = att.run(att.prepare(
        {
            "query": "Can unused vacation days be carried over?",
            "documents": DOCS,
            "answer": EARLIER_ANSWER,
            "history": history(),
        }
    ))
    prompt = run.prompt
    ((_, rows),) = answer_targets(run.answer)
    features = target_features(run.token_features, rows).double()
    first = len(prompt.doc_sources) + len(prompt.sentence_sources)
    turns = [first + i for i, p in enumerate(prompt.context_parts) if p.kind == "history"]
    expected = (
        float(features[: len(DOCS)].sum(0) @ calibration.document_weights)
        + float(features[turns].sum(0) @ calibration.history_weights)
        + calibration.head_offset
    )
    assert abs(result.citations[0].grounded - expected) < 1e-6
    assert att.scorer.groundedness(refined=True).document_weights is None


def test_evaluate_conversations_cli_reports_resumes_and_records(tmp_path, capsys, caplog):
    """`at2-rag evaluate EXAMPLES --conversations`: every example becomes a conversation on the real model; the
    summary has standard errors, the rows file makes a rerun measure nothing new (and never reuses a row of another
    follow-up, estimator or example content), `--record` updates the card."""
    import json
    import shutil

    from at2_rag.attribution.estimator import ScoreEstimator
    from at2_rag.cli import main

    examples = tmp_path / "heldout.jsonl"
    lines = [
        {"id": "vacation", "query": FIRST_QUESTION, "documents": DOCS},
        {"id": "office", "query": "When is the office open?", "documents": DOCS},
    ]
    examples.write_text("".join(json.dumps(line) + "\n" for line in lines))
    estimator = tmp_path / "estimator"
    shutil.copytree(Path(__file__).resolve().parents[1] / "at2_rag" / "estimators" / "smollm2-135m-instruct", estimator)
    output = tmp_path / "conversations.json"
    # baselines on the same runs: the same estimator must agree exactly as often, uniform weights as average
    # attention does
    shutil.copytree(estimator, tmp_path / "same")
    ScoreEstimator.uniform(30, 9).save_pretrained(tmp_path / "uniform")
    args = [
        "evaluate",
        str(examples),
        "--conversations",
        "--output",
        str(output),
        "--max-new-tokens",
        "16",
        "--baseline",
        str(tmp_path / "same"),
        "--baseline",
        str(tmp_path / "uniform"),
        "--estimator",
        str(estimator),
        "--record",
    ]
    assert main(args) == 0
    summary = json.loads(output.read_text())
    assert summary["examples"] == 2 and summary["targets"] >= 2
    for key in ("top1_agreement_at2", "top1_agreement_average", "top1_agreement_documents_only"):
        assert 0.0 <= summary[key]["mean"] <= 1.0 and "se" in summary[key]
    assert {"groundedness_auroc_at2", "groundedness_auroc_at2_score_sum", "supported_precision"} <= set(summary)
    assert summary["top1_agreement_baselines"]["same"] == summary["top1_agreement_at2"]
    assert summary["top1_agreement_baselines"]["uniform"] == summary["top1_agreement_average"]
    rows = output.with_suffix(".jsonl").read_text().splitlines()
    assert [json.loads(r)["example"] for r in rows] == ["vacation", "office"]
    recorded = ScoreEstimator.from_folder(estimator).metadata["conversations"]
    assert (
        recorded["heldout"].startswith("2 multi-turn conversations") and "top1_agreement_with_leave_one_out" in recorded
    )
    assert recorded["top1_agreement_same"] == summary["top1_agreement_at2"]
    assert "## Conversations" in (estimator / "README.md").read_text()
    capsys.readouterr()
    assert main(args[:-3]) == 0  # resumed: nothing measured again, the same summary
    assert output.with_suffix(".jsonl").read_text().splitlines() == rows
    assert json.loads(output.read_text()) == summary
    assert main([*args[:-3], "--limit", "1"]) == 0  # the full run's first conversation: nothing measured
    assert output.with_suffix(".jsonl").read_text().splitlines() == rows
    assert json.loads(output.read_text())["examples"] == 1
    # an entry measured with another follow-up (an older file, another pick) is measured again, not reused
    office = json.loads(rows[1])
    assert office["query"] == "Can you explain that in more detail?"
    output.with_suffix(".jsonl").write_text(rows[0] + "\n" + json.dumps({**office, "query": "Something else?"}) + "\n")
    with caplog.at_level("WARNING", logger="at2_rag.evaluation.conversations"):
        assert main(args[:-3]) == 0
    assert "measured with another follow-up question" in caplog.text
    again = output.with_suffix(".jsonl").read_text().splitlines()
    assert [json.loads(r)["example"] for r in again] == ["vacation", "office"] and again[0] == rows[0]
    assert json.loads(again[1])["query"] == office["query"]
    assert json.loads(output.read_text())["examples"] == 2
    # rows scored by another estimator are never mixed into this one's summary: a run with the uniform estimator
    # measures both conversations again (its tops are average attention's), and says why
    caplog.clear()
    with caplog.at_level("WARNING", logger="at2_rag.evaluation.conversations"):
        assert main([*args[:-3], "--estimator", str(tmp_path / "uniform")]) == 0
    assert "2 entries were measured with another model, answer length, estimator" in caplog.text
    uniform_entries = [json.loads(r) for r in output.with_suffix(".jsonl").read_text().splitlines()]
    assert [e["example"] for e in uniform_entries] == ["vacation", "office"]
    assert all(e["measured_with"]["estimator"] != json.loads(again[0])["measured_with"]["estimator"]
               for e in uniform_entries)
    assert all(r["at2_top"] == r["average_top"] for e in uniform_entries for r in e["rows"])
    assert json.loads(output.read_text())["top1_agreement_at2"] == summary["top1_agreement_average"]
    # the same example id with other content (a regenerated file) is measured again; the unchanged one is reused
    lines[1] = {**lines[1], "documents": [*DOCS[1:], DOCS[0]]}
    examples.write_text("".join(json.dumps(line) + "\n" for line in lines))
    caplog.clear()
    with caplog.at_level("WARNING", logger="at2_rag.evaluation.conversations"):
        assert main([*args[:-3], "--estimator", str(tmp_path / "uniform")]) == 0
    assert "1 entries were measured with another question, documents or history under the same example id" in (
        caplog.text
    )
    changed = output.with_suffix(".jsonl").read_text().splitlines()
    assert changed[0] == json.dumps(uniform_entries[0]) and json.loads(changed[1])["example"] == "office"
    assert json.loads(changed[1])["example_digest"] != uniform_entries[1]["example_digest"]


def test_follow_ups_come_from_the_whole_list():
    """Conversation i's follow-up depends on the whole held-out list, not on how many are evaluated: the
    unanswerable one (every fourth) asks the question of the example half the list away."""
    from at2_rag.evaluation.conversations import FOLLOW_UPS, KINDS, follow_up
    from at2_rag.examples import read_examples

    examples = read_examples([{"id": f"e{i}", "query": f"Question {i}?", "documents": ["Text."]} for i in range(8)])
    assert [follow_up(examples, i)[0] for i in range(8)] == list(KINDS) * 2
    assert follow_up(examples, 3) == ("unanswerable", "Question 7?")
    assert follow_up(examples, 7) == ("unanswerable", "Question 3?")
    assert follow_up(examples, 0) == ("repeat", FOLLOW_UPS["repeat"])


def test_conversation_rows_file_survives_a_killed_run_and_names_a_bad_line(tmp_path):
    """A last line cut short (a run killed mid-write) is dropped so its example is measured again; a damaged
    line elsewhere is an error naming the file and line, not a silent skip."""
    import json

    from at2_rag.errors import InputFileError
    from at2_rag.evaluation.conversations import read_row_entries

    rows = tmp_path / "rows.jsonl"
    good = json.dumps({"example": "a", "rows": []})
    rows.write_text(good + "\n" + '{"example": "b", "ro')
    assert [e["example"] for e in read_row_entries(rows)] == ["a"]
    assert rows.read_text() == good + "\n"
    rows.write_text("not json\n" + good + "\n")
    with pytest.raises(InputFileError, match="rows.jsonl line 1 is not a conversation row entry"):
        read_row_entries(rows)


def test_recording_a_conversation_run_replaces_the_earlier_runs_baselines(tmp_path):
    """The card shows the baselines of the run recorded last: an earlier run's baseline names (measured on other
    runs) are dropped, while keys other benches wrote into the same record stay."""
    import json
    import shutil

    from at2_rag.attribution.estimator import ScoreEstimator
    from at2_rag.evaluation.conversations import record_conversations, summarize_conversations

    folder = tmp_path / "estimator"
    shutil.copytree(Path(__file__).resolve().parents[1] / "at2_rag" / "estimators" / "smollm2-135m-instruct", folder)
    row = {
        "id": "a-repeat", "kind": "repeat", "loo_top": "history:1", "at2_top": "history:1", "average_top": "doc:x",
        "documents_only_top": "doc:x", "grounded": 0.5, "sum_grounded": 0.4, "average_grounded": 0.1,
        "document_score_sum": 0.3,
        "depends_on_documents": False, "supported": False,
    }
    rows = [{**row, "baseline_tops": {"old-one": "doc:x"}},
            {**row, "id": "b-repeat", "baseline_tops": {"old-one": "doc:x"}, "depends_on_documents": True,
             "grounded": 2.0}]
    record_conversations(folder, summarize_conversations(rows), "first.jsonl")
    config = json.loads((folder / "config.json").read_text())
    config["metadata"]["conversations"]["heldout_auroc_single_turn"] = {"mean": 0.9, "se": 0.1}  # another bench's
    (folder / "config.json").write_text(json.dumps(config))
    new_rows = [{**r, "baseline_tops": {"new-one": "history:1"}} for r in rows]
    record_conversations(folder, summarize_conversations(new_rows), "second.jsonl")
    recorded = ScoreEstimator.from_folder(folder).metadata["conversations"]
    assert "top1_agreement_old-one" not in recorded and recorded["top1_agreement_new-one"]["mean"] == 1.0
    assert recorded["heldout_auroc_single_turn"] == {"mean": 0.9, "se": 0.1}
    assert recorded["heldout"].endswith("(at2-rag evaluate --conversations)") and "second.jsonl" in recorded["heldout"]
    card = (folder / "README.md").read_text()
    assert "new-one" in card and "old-one" not in card


def test_near_ties_are_counted_apart_from_clear_disagreements():
    """Strict top-1 agreement counts a pick 0.1 nat short of the best source as wrong; the summary also says how
    many targets are leave-one-out near-ties, the agreement on the clear ones, and how often the pick is within a
    near-tie of the best. Rows without per-source scores (older files) are left out of these, never miscounted."""
    from at2_rag.evaluation.conversations import NEAR_TIE_NATS, near_tie_agreement, summarize_conversations

    def row(effects: list[float], scores: list[float]) -> dict:
        keys = ["doc:a", "doc:b", "history:1"]
        return {"id": "x-repeat", "kind": "repeat", "sources": keys, "leave_one_out": effects, "at2_scores": scores,
                "loo_top": keys[effects.index(max(effects))], "at2_top": keys[scores.index(max(scores))],
                "average_top": "doc:a", "documents_only_top": "doc:a", "grounded": 0.1, "sum_grounded": 0.1,
                "average_grounded": 0.1, "document_score_sum": 0.1, "depends_on_documents": False,
                "supported": False}

    assert NEAR_TIE_NATS == 0.5
    rows = [
        row([3.0, 2.9, 0.0], [0.1, 0.2, 0.0]),  # near-tie, missed by 0.1 nat: within a near-tie
        row([3.0, 1.0, 0.0], [0.3, 0.2, 0.0]),  # clear, hit
        row([3.0, 1.0, 0.0], [0.0, 0.2, 0.3]),  # clear, missed by 3 nats
        row([0.2, 0.0, 5.0], [0.0, 0.0, 0.9]),  # clear, hit
    ]
    legacy = {k: v for k, v in rows[0].items() if k not in ("leave_one_out", "at2_scores")}
    summary = summarize_conversations([*rows, legacy])
    assert summary["top1_agreement_at2"]["mean"] == pytest.approx(2 / 5)
    assert summary["leave_one_out_near_ties"] == pytest.approx({"mean": 0.25, "se": 0.25, "n": 4})
    assert summary["top1_agreement_at2_clear_targets"]["mean"] == pytest.approx(2 / 3)
    assert summary["top1_agreement_at2_clear_targets"]["n"] == 3
    assert summary["top1_within_near_tie_of_leave_one_out"]["mean"] == pytest.approx(3 / 4)
    assert near_tie_agreement([legacy]) == {}


def test_recorded_conversation_summary_is_the_summary_of_its_recorded_rows():
    """docs/bench/conversations.json (and so the model card's conversation numbers) is exactly what the committed
    rows file summarizes to: a number in the docs can be traced to its rows, and a summary change shows here."""
    import json

    from at2_rag.evaluation.conversations import summarize_conversations

    bench = Path(__file__).resolve().parents[1] / "docs" / "bench"
    rows = [r for line in (bench / "conversations.jsonl").read_text().splitlines() for r in json.loads(line)["rows"]]
    summary = json.loads(json.dumps(summarize_conversations(rows)))  # as written: JSON floats round-trip exactly
    assert summary == json.loads((bench / "conversations.json").read_text())
