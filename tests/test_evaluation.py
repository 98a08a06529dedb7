"""`at2-rag evaluate` end to end on the real model: every method, LDS, top-k drops, costs, merge and plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from at2_rag import Attributor, ScoreEstimator
from at2_rag.evaluation.report import BUDGETS, evaluate, write_report
from at2_rag.evaluation.report_files import merge_reports

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
    budget = {f"{m}+{k}" for m in ("at2", "average_attention") for k in BUDGETS} | {f"contextcite_{k}" for k in BUDGETS}
    assert set(summary) == {"at2", "average_attention", "leave_one_out", "contextcite_32", "contextcite_64"} | budget
    for row in summary.values():
        assert math.isnan(row["lds"]) or -1.0 <= row["lds"] <= 1.0
        assert math.isfinite(row["top1_drop"]) and math.isfinite(row["top3_drop"])
    by_id = {row["id"]: row for row in report["examples"]}
    for row in report["examples"]:  # the document-dependent subset is chosen by the labels, the same for all
        assert 0 <= row["num_dependent_targets"] <= row["num_targets"]
        for values in row["methods"].values():
            if row["num_dependent_targets"] == 0:
                assert math.isnan(values["lds_dependent"])
            elif row["num_dependent_targets"] == row["num_targets"]:
                assert values["lds_dependent"] == pytest.approx(values["lds"], nan_ok=True)
    # costs: attention methods need no extra pass; LOO needs n + 1; surrogates N
    assert by_id["e1"]["methods"]["leave_one_out"]["cost"]["forward_passes"] == 4
    assert by_id["e2"]["methods"]["leave_one_out"]["cost"]["forward_passes"] == 3
    assert summary["at2"]["extra_forward_passes"] == 0
    assert summary["contextcite_64"]["extra_forward_passes"] == 64
    # e2 has 2 documents: 4 distinct masks, so every budget above is capped there, as ablations=k is
    assert by_id["e2"]["methods"]["at2+8"]["cost"]["forward_passes"] == 4
    assert by_id["e1"]["methods"]["at2+4"]["cost"]["forward_passes"] == 4
    assert json.loads((tmp_path / "eval.json").read_text())["num_examples"] == 2
    assert (tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"


def _count_forward_rows(model):
    """Wrap `model.forward` to count forward calls and the masks scored (rows whose answer logits are kept)."""
    calls = {"calls": 0, "rows": 0}
    original = model.forward

    def counting(*args, **kwargs):
        calls["calls"] += 1
        if kwargs.get("logits_to_keep", 0) > 1:  # the pass that scores the answer under each mask
            calls["rows"] += kwargs["input_ids"].shape[0]
        return original(*args, **kwargs)

    model.forward = counting
    return calls, lambda: setattr(model, "forward", original)


@pytest.mark.slow
def test_evaluation_cache_reuses_ablations_and_measures_only_new_top_k_masks(smollm, tmp_path):
    from at2_rag.evaluation.ablation_cache import ExampleAblations, _cache_path

    model, tokenizer = smollm
    attributor = Attributor(model, tokenizer, estimator=ScoreEstimator.uniform(30, 9))
    uniform = {"average_attention": ScoreEstimator.uniform(30, 9)}
    cache = tmp_path / "cache"
    first = evaluate(EXAMPLES[:1], attributor, uniform, max_new_tokens=12, cache_dir=cache)
    path = _cache_path(cache, "e1")
    assert path.exists() and not list(cache.glob(".*"))  # written atomically, nothing half-written left
    saved = ExampleAblations.load(path)
    assert saved.lds_masks.shape == (32, 3) and saved.surrogate_masks.shape == (64, 3)
    assert saved.loo_lp.shape == (3, saved.full_lp.shape[0])

    calls, undo = _count_forward_rows(model)
    try:
        again = evaluate(EXAMPLES[:1], attributor, uniform, max_new_tokens=12, cache_dir=cache)
        assert calls["calls"] == 0  # nothing generated, nothing ablated
        legacy = ExampleAblations.load(path)  # a file written before the example's content was in the key
        del legacy.key["example_digest"]
        legacy.save(path)
        evaluate(EXAMPLES[:1], attributor, uniform, max_new_tokens=12, cache_dir=cache)
        assert calls["calls"] == 0  # matched on the rest of its key
        single_head = {"at2": ScoreEstimator.single_head(20, 3, 30, 9), **uniform}
        evaluate(EXAMPLES[:1], attributor, single_head, max_new_tokens=12, cache_dir=cache)
        measured = ExampleAblations.load(path)
    finally:
        undo()
    def numbers(report):  # everything but wall-clock seconds
        return [{name: {k: v for k, v in m.items() if k != "cost"} for name, m in row["methods"].items()}
                for row in report["examples"]]

    assert numbers(again) == numbers(first)
    # a new estimator costs at most its top-1 and top-3 masks, the rest is read from the cache
    assert calls["rows"] == measured.probe_masks.shape[0] <= 2
    # a different setting measures afresh instead of reusing numbers that do not apply
    other = evaluate(EXAMPLES[:1], attributor, uniform, max_new_tokens=8, cache_dir=cache)
    assert ExampleAblations.load(path).key["max_new_tokens"] == 8
    assert other["num_examples"] == 1
    # so does the same id with other content (a regenerated examples file)
    digest = ExampleAblations.load(path).key["example_digest"]
    bread = {"id": "bread", "text": "Rye bread keeps for a month."}
    evaluate([{**EXAMPLES[0], "documents": [*EXAMPLES[0]["documents"][:2], bread]}], attributor, uniform,
             max_new_tokens=8, cache_dir=cache)
    assert ExampleAblations.load(path).key["example_digest"] != digest


def test_evaluation_cache_refuses_foreign_files(tmp_path):
    from safetensors.torch import save_file

    from at2_rag.evaluation.ablation_cache import ExampleAblations

    path = tmp_path / "x.safetensors"
    save_file({"a": __import__("torch").zeros(1)}, str(path), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not an at2-rag evaluation cache"):
        ExampleAblations.load(path)


def test_recorded_evaluation_lands_in_config_and_model_card(tmp_path):
    """`at2-rag evaluate --record`: the summary is kept in config.json and rendered as a table in README.md."""
    from at2_rag.evaluation.report_files import record_evaluation

    folder = ScoreEstimator.single_head(2, 1, 4, 2, model_id="org/model").save_pretrained(tmp_path / "est")
    (folder / "training_report.json").write_text("{}")
    summary = {
        "at2": {"lds": 0.6123, "lds_sem": 0.0211, "top1_drop": 12.5, "top1_drop_sem": 1.25, "top3_drop": 20.0,
                "top3_drop_sem": float("nan"), "extra_forward_passes": 0.0, "seconds_per_example": 0.001},
        "contextcite_32": {"lds": float("nan"), "top1_drop": 13.0, "top3_drop": 21.0, "extra_forward_passes": 32.0},
    }
    record_evaluation(folder, {"num_examples": 7, "lds_masks": 32, "summary": summary}, "heldout.jsonl")

    loaded = ScoreEstimator.from_pretrained(folder)
    assert loaded.metadata["evaluation"]["num_examples"] == 7
    assert loaded.metadata["evaluation"]["summary"]["at2"]["lds"] == pytest.approx(0.6123)
    assert loaded.head_weights()[2, 1] == 1  # the weights themselves are untouched
    assert (folder / "training_report.json").read_text() == "{}"  # the rest of the folder stays
    card = (folder / "README.md").read_text()
    assert "## Evaluation (7 held-out examples, heldout.jsonl)" in card
    assert "| at2 | 0.612 ± 0.021 | n/a | 12.50 ± 1.25 | 20.00 | 0.0 |" in card
    assert "| contextcite_32 | n/a | n/a | 13.00 | 21.00 | 32.0 |" in card


def test_record_needs_an_estimator_folder(tmp_path, capsys):
    from at2_rag.cli import main

    with pytest.raises(SystemExit, match="--record needs --estimator"):
        main(["evaluate", "--merge", str(tmp_path / "part.json"), "--record"])


# ---- pluggable metrics: one registration, nowhere else ------------------------------------------------------
def _additive_view(method, scores, effects):
    """A MethodScores over an exactly additive answer: log p(kept) = -sum of the removed sources' effects."""
    import torch

    from at2_rag.evaluation.registry import MethodScores

    n = len(effects)
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(32, n, generator=gen) < 0.5
    truth = masks.double() @ torch.tensor(effects, dtype=torch.double)
    measured = []

    def measure(keep_masks):
        measured.extend(keep_masks)
        return [-sum(e for e, kept in zip(effects, m) if not kept) for m in keep_masks]

    whole = torch.tensor(scores, dtype=torch.float32)
    view = MethodScores(method, torch.stack([whole, whole]), masks, [truth], [True], measure)
    return view, measured


def test_a_registered_metric_reaches_summary_plot_and_model_card(tmp_path):
    from at2_rag.evaluation.plots import plot_summary
    from at2_rag.evaluation.registry import MetricColumn, metrics, register_metric, unregister_metric
    from at2_rag.evaluation.report import summarize
    from at2_rag.evaluation.report_files import record_evaluation

    @register_metric("top1_share", MetricColumn("top1_share", "share of the top source", digits=3))
    def top1_share(m):
        whole = m.scores[-1]
        return {"top1_share": float(whole.max() / whole.abs().sum())}

    try:
        effects = [4.0, 1.0, 0.0]
        rows = []
        for i, scores in enumerate(([3.0, 1.0, 0.0], [0.0, 1.0, 3.0])):  # right ranking, reversed ranking
            view, measured = _additive_view("at2", scores, effects)
            values = {}
            for metric in metrics():
                values.update(metric(view))
            rows.append({"id": str(i), "methods": {"at2": {**values, "cost": {"forward_passes": 0, "seconds": 0.5}}}})
        first, second = (r["methods"]["at2"] for r in rows)
        assert first["lds"] == pytest.approx(1.0) and second["lds"] < 0.5  # additive truth: exact scores rank best
        assert first["top1_drop"] == pytest.approx(4.0) and second["top1_drop"] == pytest.approx(0.0)
        assert first["top3_drop"] == pytest.approx(5.0)
        assert first["top1_share"] == pytest.approx(0.75)

        summary = summarize(rows)
        assert summary["at2"]["top1_share"] == pytest.approx(0.75)
        assert summary["at2"]["top1_drop"] == pytest.approx(2.0)
        assert summary["at2"]["top1_drop_sem"] == pytest.approx(2.0)
        assert summary["at2"]["extra_forward_passes"] == 0 and "extra_forward_passes_sem" not in summary["at2"]
        assert plot_summary(summary, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"

        folder = ScoreEstimator.uniform(4, 2, model_id="org/model").save_pretrained(tmp_path / "est")
        record_evaluation(folder, {"num_examples": 2, "summary": summary}, "heldout.jsonl")
        card = (folder / "README.md").read_text()
        assert "| top-3 log-prob drop | share of the top source | extra forward passes |" in card
        assert "| 0.750 ± 0.000 | 0.0 |" in card
        reloaded = ScoreEstimator.from_pretrained(folder)  # the recorded columns pass the strict loader
        assert [c["key"] for c in reloaded.metadata["evaluation"]["columns"]][-2:] == ["top1_share",
                                                                                       "extra_forward_passes"]
    finally:
        unregister_metric("top1_share")
    assert "top1_share" not in [m.name for m in metrics()]


def test_metric_registry_refuses_bad_metrics():
    from at2_rag import InvalidInputError
    from at2_rag.evaluation.registry import MetricColumn, metrics, register_metric, unregister_metric

    with pytest.raises(ValueError, match="already reported by lds"):
        register_metric("mine", MetricColumn("lds", "LDS again"))(lambda m: {"lds": 0.0})
    with pytest.raises(ValueError, match="already reported by the evaluation itself"):
        register_metric("mine", MetricColumn("extra_forward_passes", "passes"))(lambda m: {})
    with pytest.raises(InvalidInputError, match="unknown metric.*'nope'.*registered: lds, top_k_drop"):
        metrics(["nope"])

    register_metric("wrong_keys", MetricColumn("wrong_a", "a"))(lambda m: {"wrong_b": 1.0})
    try:
        view, _ = _additive_view("x", [1.0, 0.0], [1.0, 0.0])
        with pytest.raises(TypeError, match="'wrong_keys' must return a dict with keys \\['wrong_a'\\]"):
            metrics(["wrong_keys"])[0](view)
        with pytest.raises(ValueError, match="needs 2 entries"):
            view.answer_log_prob([True])
    finally:
        unregister_metric("wrong_keys")


def test_evaluate_cli_refuses_an_unknown_metric_before_loading_the_model(tmp_path, capsys):
    from at2_rag.cli import main

    examples = tmp_path / "x.jsonl"
    examples.write_text(json.dumps(EXAMPLES[0]) + "\n")
    assert main(["evaluate", str(examples), "--metrics", "lds", "nope"]) == 2
    assert "unknown metric(s) 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("budget", ["0", "-2", "four", "1.5"])
def test_evaluate_cli_refuses_a_bad_budget(tmp_path, capsys, budget):
    from at2_rag.cli import main

    examples = tmp_path / "x.jsonl"
    examples.write_text(json.dumps(EXAMPLES[0]) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(examples), "--budgets", "2", budget])
    assert exit_info.value.code == 2
    assert "a budget is a positive integer of ablation passes" in capsys.readouterr().err


@pytest.mark.slow
def test_budget_curve_refines_and_fits_contextcite_on_the_same_chosen_masks(smollm, tmp_path):
    """At budget k every method observes the k most informative distinct masks of the example's random pool (the
    run-time design): recomputing AT2+k and ContextCite-k from the cached ablations gives the reported LDS; the
    curve is drawn from the summary."""
    from at2_rag.attribution.refine import RefinementPrior, refine_scores
    from at2_rag.capture.masked import target_log_odds
    from at2_rag.evaluation.ablation_cache import ExampleAblations, _cache_path
    from at2_rag.evaluation.baselines import surrogate_scores
    from at2_rag.evaluation.metrics import lds
    from at2_rag.evaluation.plots import budget_curves
    from at2_rag.evidence.ablations import most_informative

    model, tokenizer = smollm
    attributor = Attributor(model, tokenizer, estimator=ScoreEstimator.uniform(30, 9))
    heads = ScoreEstimator.single_head(20, 3, 30, 9)
    cache = tmp_path / "cache"
    report = evaluate(EXAMPLES[:1], attributor, {"at2": heads}, max_new_tokens=12, cache_dir=cache,
                      budgets=[2, 4, 32], curve=tmp_path / "curve.png")
    assert report["budgets"] == [2, 4, 32]
    # a budget equal to a ContextCite size keeps that (random-mask) ContextCite and still measures AT2+k
    assert {"at2+2", "at2+4", "at2+32", "contextcite_2", "contextcite_4", "contextcite_32"} <= set(report["summary"])
    data = ExampleAblations.load(_cache_path(cache, "e1"))
    seen, distinct = set(), []
    for i, m in enumerate(data.surrogate_masks.tolist()):
        if tuple(m) not in seen:
            seen.add(tuple(m))
            distinct.append(i)
    pool, pool_lp = data.surrogate_masks[distinct], data.surrogate_lp[distinct]
    row = report["examples"][0]["methods"]
    for k in (2, 4):
        chosen = most_informative(pool, k)
        masks, lps = pool[chosen], pool_lp[chosen]
        truths = [target_log_odds(data.lds_lp, rows) for rows in data.target_rows[:-1]]
        refined = [refine_scores(heads(f), masks, target_log_odds(lps, rows), RefinementPrior.from_metadata({}))
                   for f, rows in zip(data.features, data.target_rows)]
        fitted = [surrogate_scores(masks, target_log_odds(lps, rows)) for rows in data.target_rows]
        for name, scores in ((f"at2+{k}", refined), (f"contextcite_{k}", fitted)):
            values = [lds(s.float(), data.lds_masks, y.float()) for s, y in zip(scores, truths)]
            values = [v for v in values if v == v]
            expected = sum(values) / len(values) if values else float("nan")
            assert row[name]["lds"] == pytest.approx(expected, abs=1e-6, nan_ok=True), name
            assert row[name]["cost"]["forward_passes"] == k
    curves = budget_curves(report["summary"], "lds")
    # AT2+32 on an example of 3 sources: the design caps k at the 8 distinct masks, and the curve plots the passes
    assert [p[0] for p in curves["at2"]] == [0, 2, 4, 8]
    assert report["examples"][0]["methods"]["at2+32"]["cost"]["forward_passes"] == 8
    # ContextCite on the chosen masks is the budget curve; the random-mask sizes are another design, drawn apart
    assert [p[0] for p in curves["contextcite"]] == [2, 4]
    assert [p[0] for p in curves["contextcite_random"]] == [32, 64]
    assert [p[0] for p in curves["leave_one_out"]] == [4]
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_merge_refuses_parts_of_different_evaluations_or_the_same_part_twice(tmp_path):
    """`--merge` joins the parts of one evaluation: parts with another model, estimator, seed, answer length or
    budgets, or an example in two parts (a part passed twice), are errors naming the difference, never one
    summary averaged over both."""
    from at2_rag.errors import InputFileError

    def part(name: str, ids: list[str], **fields) -> Path:
        path = tmp_path / f"{name}.json"
        base = {"model_id": "m", "estimator": "e", "seed": 1, "max_new_tokens": 64, "lds_masks": 32, "budgets": [2]}
        path.write_text(json.dumps({**base, **fields, "examples": [{"id": i} for i in ids]}))
        return path

    first = part("first", ["a", "b"])
    for field, value in (("estimator", "other"), ("model_id", "m2"), ("seed", 2), ("max_new_tokens", 32),
                         ("budgets", [2, 4])):
        with pytest.raises(InputFileError, match=f"different {field}"):
            merge_reports([first, part("second", ["c"], **{field: value})])
    with pytest.raises(InputFileError, match=r"example a is in two parts \(.*first.json and .*first.json\)"):
        merge_reports([first, first])


def test_evaluate_cli_measures_the_shipped_estimator_by_default_and_records_what_it_measured(tmp_path):
    """`at2-rag evaluate FILE` without --estimator evaluates the model's shipped estimator (not uniform weights),
    and --record with --limit describes the examples it measured, not the whole file."""
    import shutil

    from at2_rag.cli import main

    examples = tmp_path / "heldout.jsonl"
    examples.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    shipped = Path(__file__).resolve().parents[1] / "at2_rag" / "estimators" / "smollm2-135m-instruct"
    folder = tmp_path / "estimator"
    shutil.copytree(shipped, folder)
    common = [str(examples), "--limit", "1", "--max-new-tokens", "8", "--metrics", "lds", "--budgets", "2", "--cache",
              str(tmp_path / "cache"), "--plot", str(tmp_path / "p.png"), "--curve", str(tmp_path / "c.png")]
    first = ["--output", str(tmp_path / "a.json"), "--estimator", str(folder), "--record"]
    assert main(["evaluate", *common, *first]) == 0
    recorded = ScoreEstimator.from_folder(folder).metadata["evaluation"]
    assert recorded["examples"] == f"examples 0-0 of {examples}" and recorded["num_examples"] == 1
    assert main(["evaluate", *common, "--output", str(tmp_path / "b.json")]) == 0  # the cache: no new passes
    with_folder, default = (json.loads((tmp_path / f"{n}.json").read_text())["summary"] for n in "ab")
    assert default["at2"]["lds"] == with_folder["at2"]["lds"] != default["average_attention"]["lds"]


def test_budget_curve_of_the_recorded_evaluation_keeps_random_mask_contextcite_apart(tmp_path):
    """The README's curve: ContextCite-k on the chosen masks stops at the largest budget; ContextCite-32/64 fitted
    on random masks are their own labelled family, never drawn as the same-masks line's continuation."""
    from at2_rag.evaluation.plots import CURVE_LABELS, budget_curves, plot_budget_curve

    summary = json.loads((Path(__file__).parents[1] / "docs/eval/smollm2-heldout.json").read_text())["summary"]
    curves = budget_curves(summary, "lds")
    passes = {name: values["extra_forward_passes"] for name, values in summary.items()}  # k, or fewer distinct masks
    assert [p[0] for p in curves["contextcite"]] == [passes[f"contextcite_{k}"] for k in BUDGETS]
    assert [p[0] for p in curves["contextcite_random"]] == [32, 64]
    assert curves["contextcite_random"][0][1] == pytest.approx(summary["contextcite_32"]["lds"])
    assert [p[0] for p in curves["at2"]] == [0, *(passes[f"at2+{k}"] for k in BUDGETS)]
    assert "random" in CURVE_LABELS["contextcite_random"] and "same" in CURVE_LABELS["contextcite"]
    assert plot_budget_curve(summary, tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
