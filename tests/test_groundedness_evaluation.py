"""`at2-rag evaluate --groundedness`: both modes against an independent masked pass, on the real model, and the
summary / record / model card path."""

from __future__ import annotations

import json

import pytest

from at2_rag import Attributor, ScoreEstimator
from at2_rag.cli import main
from at2_rag.evaluation.groundedness import evaluate_groundedness, groundedness_record, summarize
from at2_rag.examples import read_examples

DOCS = [
    {"id": "gpu", "text": "The model was trained on 64 A100 GPUs. Training took three weeks."},
    {"id": "food", "text": "The cafeteria serves pizza on Fridays and soup on Mondays."},
]


def _row(example: str, drop: float, measured: float, estimated: float, mismatched: bool = False) -> dict:
    return {
        "id": example, "mismatched": mismatched, "sentence": "s", "log_prob_drop": drop,
        "depends_on_documents": drop >= 1.0, "measured_grounded": measured, "measured_supported": measured >= 1.0,
        "estimated_grounded": estimated, "estimated_supported": estimated >= 1.0,
    }


def test_summary_counts_auroc_precision_and_recall_per_mode():
    rows = [
        _row("a", 5.0, 5.2, 2.0), _row("a", 0.1, 0.2, 3.0),
        _row("b", 3.0, 3.1, 0.5), _row("b", -0.5, -0.4, -1.0), _row("c", 2.0, 2.5, 1.5, mismatched=True),
    ]
    summary = summarize(rows)
    assert (summary["examples"], summary["sentences"]) == (3, 5)
    assert summary["measured"]["auroc"]["mean"] == 1.0
    assert summary["measured"]["supported_precision"]["mean"] == summary["measured"]["supported_recall"]["mean"] == 1
    # estimated ranks the 0.1-nat sentence (3.0) above all three dependent ones, the -0.5-nat one below: AUROC 3/6
    assert summary["estimated"]["auroc"]["mean"] == pytest.approx(3 / 6)
    assert summary["estimated"]["supported_precision"]["mean"] == pytest.approx(2 / 3)
    assert summary["estimated"]["supported_recall"]["mean"] == pytest.approx(2 / 3)
    assert summary["estimated"]["auroc"]["se"] > 0  # resampled over the three examples
    record = groundedness_record({"all": summary, "matched": summarize(rows[:4])}, "set.jsonl")
    assert set(record) == {"set.jsonl", "set.jsonl (matched)"}
    assert record["set.jsonl"]["estimated_auroc"]["mean"] == pytest.approx(3 / 6)


@pytest.mark.slow
def test_evaluate_groundedness_on_the_real_model(att, tmp_path):
    examples = read_examples([
        {"id": "on", "query": "What GPUs were used?", "documents": DOCS},
        {"id": "off", "query": "What is the capital of Peru?", "documents": DOCS},
    ])
    out = tmp_path / "g.json"
    summary = evaluate_groundedness(att, examples, out, max_new_tokens=24, mismatched={"off"})
    rows_path = out.with_suffix(".jsonl")
    entries = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert [e["example"] for e in entries] == ["on", "off"]  # one line per example: recorded whole or not at all
    rows = [r for e in entries for r in e["rows"]]
    assert {r["id"] for r in rows} == {"on", "off"} and summary["mismatched"]["sentences"] >= 1
    for row in rows:  # measured grounded is a log-odds drop, the label a log-prob drop: same sign, no smaller
        assert row["measured_grounded"] * row["log_prob_drop"] >= 0
        assert abs(row["measured_grounded"]) >= abs(row["log_prob_drop"]) - 1e-3
    assert json.loads(out.read_text())["all"]["sentences"] == len(rows)
    # resumed: nothing measured again
    again = evaluate_groundedness(att, examples, out, max_new_tokens=24, mismatched={"off"})
    assert json.dumps(again) == json.dumps(summary)  # NaN (one class missing in a part) equals itself here
    assert len(rows_path.read_text().splitlines()) == 2
    # a killed run's cut-short last line is dropped and that example measured again; so is another answer length
    rows_path.write_text(rows_path.read_text()[:-40])
    evaluate_groundedness(att, examples, out, max_new_tokens=24, mismatched={"off"})
    assert [json.loads(line)["example"] for line in rows_path.read_text().splitlines()] == ["on", "off"]
    evaluate_groundedness(att, examples[:1], out, max_new_tokens=8)
    last = json.loads(rows_path.read_text().splitlines()[-1])
    assert last["example"] == "on" and last["key"]["max_new_tokens"] == 8


@pytest.mark.slow
def test_cli_records_the_evaluation_in_the_estimator_card(smollm, tmp_path, capsys):
    model, tokenizer = smollm
    folder = tmp_path / "est"
    Attributor(model, tokenizer).estimator.save_pretrained(folder)
    examples = tmp_path / "ex.jsonl"
    lines = [{"id": "on", "query": "What GPUs were used?", "documents": DOCS},
             {"id": "off", "query": "Who wrote Hamlet?", "documents": DOCS, "mismatched": True}]
    examples.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    code = main(["evaluate", str(examples), "--groundedness", "--estimator", str(folder), "--record",
                 "--max-new-tokens", "16", "--output", str(tmp_path / "g.json")])
    assert code == 0
    recorded = ScoreEstimator.from_pretrained(folder).metadata["groundedness_evaluation"]
    assert {str(examples), f"{examples} (mismatched)"} <= set(recorded)
    card = (folder / "README.md").read_text()
    assert "Groundedness evaluated" in card and "estimated AUROC" in card
    capsys.readouterr()
    assert main(["evaluate", str(examples), "--groundedness", "--plot", "x.png"]) == 2
    assert "--plot" in capsys.readouterr().err
