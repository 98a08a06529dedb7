"""`at2-rag evaluate` end to end on the real model: every method, LDS, top-k drops, costs, merge and plot."""

from __future__ import annotations

import json
import math

import pytest

from at2_rag import Attributor, ScoreEstimator
from at2_rag.evaluation.report import evaluate, merge_reports, write_report

EXAMPLES = [
    {"id": "e1", "query": "What colour is the Zorvan flag?",
     "documents": [{"id": "flag", "text": "The Zorvan flag is green with a white star."},
                   {"id": "river", "text": "The Tamsk river freezes every January."},
                   {"id": "bread", "text": "Rye bread keeps for a week."}]},
    {"id": "e2", "query": "When does the Tamsk river freeze?",
     "documents": [{"id": "river", "text": "The Tamsk river freezes every January."},
                   {"id": "flag", "text": "The Zorvan flag is green with a white star."}]},
]


@pytest.mark.slow
def test_evaluate_reports_every_method_with_costs(smollm, tmp_path):
    model, tokenizer = smollm
    attributor = Attributor(model, tokenizer, estimator=ScoreEstimator.uniform(30, 9))
    heads = ScoreEstimator.single_head(20, 3, 30, 9)
    estimators = {"at2": heads, "average_attention": ScoreEstimator.uniform(30, 9)}
    parts = []
    for k in range(2):
        out = tmp_path / f"part{k}.json"
        evaluate(EXAMPLES, attributor, estimators, output=out, max_new_tokens=12, part=(k, 2))
        parts.append(out)
    report = merge_reports(parts)
    write_report(report, tmp_path / "eval.json", tmp_path / "eval.png")
    assert report["num_examples"] == 2
    summary = report["summary"]
    assert set(summary) == {"at2", "average_attention", "leave_one_out", "contextcite_32", "contextcite_64"}
    for name, row in summary.items():
        assert math.isnan(row["lds"]) or -1.0 <= row["lds"] <= 1.0
        assert math.isfinite(row["top1_drop"]) and math.isfinite(row["top3_drop"])
    # costs: attention methods need no extra pass; LOO needs n + 1; surrogates N
    by_id = {row["id"]: row for row in report["examples"]}
    assert by_id["e1"]["methods"]["leave_one_out"]["cost"]["forward_passes"] == 4
    assert by_id["e2"]["methods"]["leave_one_out"]["cost"]["forward_passes"] == 3
    assert summary["at2"]["extra_forward_passes"] == 0
    assert summary["contextcite_64"]["extra_forward_passes"] == 64
    assert json.loads((tmp_path / "eval.json").read_text())["num_examples"] == 2
    assert (tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"
