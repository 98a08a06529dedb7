"""Hardening: bad examples in `collect` and unreadable user files everywhere in the CLI.

`collect` checks every example before any model work and names each bad one (line and id); `--skip-invalid`
collects the good ones and reports the bad; whatever stops a run, the examples finished so far are on disk; a
killed writer's temp shard is cleaned up by the next run. A binary, non-UTF-8 or non-JSON file given to any
command is a one-line error naming the file (and line), exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from at2_rag.cli import main, read_documents
from at2_rag.errors import InputFileError, InvalidExamplesError, InvalidInputError
from at2_rag.storage.files import read_jsonl
from at2_rag.training.data import (
    Example,
    completed_ids,
    load_collected,
    read_examples,
    remove_stale_temp_shards,
    scan_examples,
    shard_paths,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    {"id": "rover", "text": "The Orion rover landed in 2031. It carries a drill."},
    {"id": "basil", "text": "Basil grows best in warm weather."},
]
FAST = ["--num-masks", "2", "--max-new-tokens", "8", "--batch-size", "3"]  # a real run, kept tiny
FAST_KW = {"num_masks": 2, "max_new_tokens": 8, "batch_size": 3, "rank": 0, "world_size": 1}


def write_jsonl(path: Path, lines: list) -> Path:
    """One line per item: a dict or list is dumped as JSON, a str is written as is (to make bad lines)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def attributor(smollm):
    """The real embedded model behind an Attributor as `at2-rag collect` builds it (uniform estimator)."""
    from at2_rag import Attributor, ScoreEstimator
    from at2_rag.capture.attention import model_shape

    model, tokenizer = smollm
    layers, heads = model_shape(model)
    return Attributor(
        model, tokenizer, estimator=ScoreEstimator.uniform(layers, heads, model_id=model.config.name_or_path)
    )


# ---- item 3: collect and bad examples ------------------------------------------------------------------
def test_collect_refuses_every_bad_example_by_line_and_id_before_loading_the_model(tmp_path, capsys):
    src = write_jsonl(tmp_path / "examples.jsonl", [
        {"id": "good", "query": "When did the rover land?", "documents": DOCS},
        {"id": "nodocs", "query": "When did the rover land?", "documents": []},
        "",
        {"id": "noquery", "query": "  ", "documents": DOCS},
        "{not json",
        ["an", "array"],
        {"id": "good", "query": "Again?", "documents": DOCS},
        {"query": "no documents key"},
    ])
    out = tmp_path / "shards"
    for _ in range(2):  # a rerun gives the same answer: nothing half-done in between
        code, stdout, err = run_main(capsys, "collect", str(src), str(out), *FAST)
        assert code == 2 and not stdout
        assert "Traceback" not in err
        assert "6 invalid examples in" in err and str(src) in err
        assert "line 2 (id 'nodocs'): no documents were given" in err
        assert "line 4 (id 'noquery'): query is empty" in err
        assert "line 5: is not valid JSON" in err
        assert "line 6: is an array, not an object with 'query' and 'documents'" in err
        assert "line 7 (id 'good'): id 'good' is already used by line 1" in err
        assert "line 8 (id '6'): needs 'query' and 'documents' (missing 'documents'" in err
        assert "--skip-invalid" in err
        assert not out.exists()  # refused before the model loaded and before any output


@pytest.mark.slow
def test_collect_skip_invalid_keeps_the_good_reports_the_bad_and_cleans_stale_temp_shards(tmp_path, capsys, caplog,
                                                                                          attributor):
    src = write_jsonl(tmp_path / "examples.jsonl", [
        {"id": "q0", "query": "When did the Orion rover land?", "documents": DOCS},
        {"id": "bad-docs", "query": "What does the rover carry?", "documents": []},
        {"id": "bad-query", "query": "", "documents": DOCS},
        {"id": "q3", "query": "When does basil grow best?", "documents": DOCS},
    ])
    out = tmp_path / "shards"
    out.mkdir()
    stale = [out / ".shard-r00-18c0ffee-q0.safetensors.k3x9q1.tmp", out / ".shard-r07-18c0ffee-x.safetensors.a.tmp"]
    for path in stale:  # what SIGKILL during write_shard leaves behind
        path.write_bytes(b"half a shard")
    caplog.set_level(logging.WARNING, logger="at2_rag")
    code, stdout, err = run_main(capsys, "collect", str(src), str(out), *FAST, "--shard-size", "1", "--skip-invalid")
    assert code == 0, err[-2000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["collected"] + summary["skipped"] == 2
    assert [(p["line"], p["id"]) for p in summary["invalid"]] == [(2, "bad-docs"), (3, "bad-query")]
    assert "no documents were given" in summary["invalid"][0]["reason"]
    assert summary["invalid"][1]["reason"] == "query is empty"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("line 2 (id 'bad-docs')" in w for w in warnings) and any(
        "line 3 (id 'bad-query')" in w for w in warnings
    )
    assert completed_ids(out) <= {"q0", "q3"} and len(completed_ids(out)) == summary["collected"] >= 1
    assert not any(p.exists() for p in stale), "the killed writer's temp shards were left behind"
    assert not list(out.glob(".*"))
    shards_before = sorted(p.name for p in shard_paths(out))

    # rerun without the flag: still refused, naming both, and nothing collected is touched
    with pytest.raises(InvalidExamplesError) as refused:
        from at2_rag.training.collect import collect

        collect(src, out, attributor, **FAST_KW)
    assert [(p.line, p.id) for p in refused.value.problems] == [(2, "bad-docs"), (3, "bad-query")]
    # rerun with it: nothing left to do, the bad ones reported again, no new shard
    again = collect(src, out, attributor, skip_invalid=True, **FAST_KW)
    assert again["collected"] == 0 and [p["id"] for p in again["invalid"]] == ["bad-docs", "bad-query"]
    assert sorted(p.name for p in shard_paths(out)) == shards_before


@pytest.mark.slow
def test_collect_writes_finished_examples_before_a_mid_run_failure_propagates(tmp_path, attributor):
    """An error mid-run (here an out-of-memory in the model's forward on the second example) used to throw away
    every example finished since the last full shard."""
    from at2_rag.training.collect import collect

    long_doc = {
        "id": "long",
        "text": " ".join(f"Fact {i}: the rover drill bit number {i} is made of steel." for i in range(5)),
    }
    examples = [
        {"id": "q0", "query": "When did the Orion rover land?", "documents": DOCS},
        {"id": "q1", "query": "What are the drill bits made of?", "documents": [*DOCS, long_doc]},
    ]
    src = write_jsonl(tmp_path / "examples.jsonl", examples)
    second_prompt = attributor.render(examples[1]["query"], examples[1]["documents"]).num_tokens
    assert second_prompt > attributor.render(examples[0]["query"], DOCS).num_tokens + 8 + 1

    def out_of_memory_on_the_second_example(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] >= second_prompt:
            raise RuntimeError("CUDA out of memory (simulated)")

    out = tmp_path / "shards"
    handle = attributor.model.register_forward_pre_hook(out_of_memory_on_the_second_example, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            collect(src, out, attributor, shard_size=16, **FAST_KW)
    finally:
        handle.remove()
    assert completed_ids(out) == {"q0"}, "the finished example was lost"
    assert not list(out.glob(".*"))
    resumed = collect(src, out, attributor, shard_size=16, **FAST_KW)
    assert resumed["collected"] + resumed["skipped"] == 1  # only q1: q0 is not redone
    ids = [e.id for e in load_collected(out)]
    assert ids == sorted(set(ids)) and "q0" in ids


@pytest.mark.slow
def test_collect_refuses_an_example_too_long_for_the_model_before_any_model_work(tmp_path, attributor):
    from at2_rag.training.collect import collect

    window = attributor.context_window
    huge = {"id": "huge", "text": "word " * (window + 100)}
    src = write_jsonl(tmp_path / "examples.jsonl", [
        {"id": "q0", "query": "When did the Orion rover land?", "documents": DOCS},
        {"id": "too-long", "query": "What is this?", "documents": [huge]},
    ])
    out = tmp_path / "shards"
    with pytest.raises(InvalidExamplesError, match=r"line 2 \(id 'too-long'\): The prompt needs \d+ tokens") as exc:
        collect(src, out, attributor, **FAST_KW)
    assert [p.id for p in exc.value.problems] == ["too-long"]
    assert shard_paths(out) == []  # q0 was not collected first: the check ran before any generation


def test_stale_temp_shards_of_other_live_ranks_are_left_alone(tmp_path):
    names = [".shard-r00-1-a.safetensors.x.tmp", ".shard-r01-1-b.safetensors.y.tmp", ".shard-r05-1-c.safetensors.z.tmp",
             ".shard-odd.tmp"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "shard-r00-1-a.safetensors").write_bytes(b"kept")
    removed = remove_stale_temp_shards(tmp_path, rank=0, world_size=2)
    assert sorted(p.name for p in removed) == sorted([names[0], names[2], names[3]])  # rank 1 may be writing its own
    assert sorted(p.name for p in tmp_path.iterdir()) == [names[1], "shard-r00-1-a.safetensors"]


def test_scan_examples_names_every_problem_and_keeps_ids_and_positions(tmp_path):
    src = write_jsonl(tmp_path / "e.jsonl", [
        {"query": "q", "documents": ["d"]},
        "",
        {"id": 7, "query": "q", "documents": ["d"], "history": "not a list"},
        {"id": True, "query": "q", "documents": ["d"]},
        {"id": "x", "query": 3, "documents": ["d"]},
        {"id": "y", "query": "q", "documents": [{"title": "no text"}]},
        '"a string"',
    ])
    scanned = scan_examples(src)
    assert [(e.id, e.line, e.position) for e in scanned.examples] == [("0", 1, 0)]  # default id = position, as before
    assert [(p.line, p.id) for p in scanned.invalid] == [(3, "7"), (4, None), (5, "x"), (6, "y"), (7, None)]
    reasons = [p.reason for p in scanned.invalid]
    assert reasons[0] == "history must be a list of earlier turns, got a string"
    assert reasons[1] == "id must be a string or an integer, got a boolean"
    assert reasons[2] == "query must be a string, got a number"
    assert "document 0 is a mapping without a 'text' key" in reasons[3]
    assert reasons[4] == "is a string, not an object with 'query' and 'documents'"
    with pytest.raises(InvalidExamplesError, match="5 invalid examples") as exc:
        read_examples(src)
    assert isinstance(exc.value, InvalidInputError) and len(exc.value.problems) == 5
    assert [e.id for e in read_examples(src, skip_invalid=True)] == ["0"]
    assert read_examples(src, limit=1)[0].id == "0"  # bad examples past --limit do not block
    # in memory: named by position
    with pytest.raises(InvalidExamplesError, match=r"example 1 \(id 'b'\): query is empty"):
        read_examples([Example("a", "q", ["d"]), {"id": "b", "query": "", "documents": ["d"]}])


# ---- item 4: unreadable user files ---------------------------------------------------------------------
def _latin1_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "ok"}\n{"text": "caf\u00e9 cr\u00e8me"}\n'.encode("latin-1"))
    return path


def _binary(tmp_path: Path) -> Path:
    path = tmp_path / "bin.jsonl"
    path.write_bytes(bytes(range(256)) * 4)
    return path


def _latin1_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("Fine UTF-8 text.", encoding="utf-8")
    (folder / "b.txt").write_bytes("Na\u00efve latin-1 text.".encode("latin-1"))
    return folder


def _bad_json(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, "", '{"text": "unterminated'])


def _not_object(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "arr.jsonl", [{"text": "fine"}, [1, 2]])


@pytest.mark.parametrize("make, expected", [
    (_latin1_jsonl, "latin1.jsonl:2 is not UTF-8 text: byte 0xe9 at column 14"),
    (_binary, "bin.jsonl: it looks like a binary file"),
    (_latin1_folder, "b.txt:1 is not UTF-8 text: byte 0xef at column 3"),
    (_bad_json, "bad.jsonl:3 is not valid JSON: Unterminated string"),
    (_not_object, "arr.jsonl:2 is an array; each line needs an object with a string field 'text'"),
    (lambda tmp_path: Path("/proc"), "cannot list the folder /proc/|/proc contains no .txt or .md files"),
    (lambda tmp_path: Path("/dev/null"), "/dev/null: it is not a regular file"),
])
def test_attribute_names_the_unreadable_documents_file(tmp_path, capsys, make, expected):
    path = make(tmp_path)
    code, stdout, err = run_main(capsys, "attribute", "--query", "q", "--documents", str(path))
    assert code == 2 and not stdout
    assert any(e in err for e in expected.split("|")), err
    assert "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("make, expected", [
    (_latin1_jsonl, "line 2: is not UTF-8 text: byte 0xe9 at column 14"),
    (_binary, "bin.jsonl: it looks like a binary file"),
    (lambda tmp_path: tmp_path, "is a folder, not a file of examples (JSONL)"),
    (lambda tmp_path: tmp_path / "missing.jsonl", "missing.jsonl does not exist"),
])
def test_collect_and_evaluate_name_the_unreadable_examples_file(tmp_path, capsys, make, expected):
    path = make(tmp_path)
    for argv in (["collect", str(path), str(tmp_path / "out")], ["evaluate", str(path)]):
        code, stdout, err = run_main(capsys, *argv)
        assert code == 2 and not stdout, err
        assert expected in err and str(path) in err, err
        assert "Traceback" not in err


def test_train_and_merge_name_the_unreadable_file(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "shard-r00-1-a.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    code, _, err = run_main(capsys, "train", str(shards), str(tmp_path / "est"))
    assert code == 2 and "shard-r00-1-a.safetensors is not a readable at2-rag shard" in err and "Traceback" not in err
    code, _, err = run_main(capsys, "train", str(_latin1_jsonl(tmp_path)), str(tmp_path / "est"))
    assert code == 2 and "latin1.jsonl is not a folder of collected shards" in err
    code, _, err = run_main(capsys, "train", str(tmp_path / "empty"), str(tmp_path / "est"))
    assert code == 2 and "is not a folder of collected shards" in err
    # a second data folder is checked like the first, and nothing is written
    conversations = Path(__file__).resolve().parents[1] / "data" / "collected" / "smollm2-conversations"
    code, _, err = run_main(capsys, "train", str(conversations), str(shards), str(tmp_path / "est"))
    assert code == 2 and "shard-r00-1-a.safetensors is not a readable at2-rag shard" in err and "Traceback" not in err
    assert not (tmp_path / "est").exists()
    # shards of two models (different head counts) cannot train one estimator: named, before any training
    from at2_rag.training.data import CollectedExample, write_shard

    for name, width in (("a", 12), ("b", 20)):
        (tmp_path / name).mkdir()
        ex = CollectedExample(name, torch.rand(1, 3, width), torch.rand(32, 3) < 0.5, torch.rand(1, 32), torch.rand(1),
                              {"id": name})
        write_shard(tmp_path / name / "shard-r00-1-a.safetensors", [ex])
    code, _, err = run_main(capsys, "train", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "est"))
    assert code == 2 and "has 20 features per source" in err and "different models" in err, err
    assert not (tmp_path / "est").exists()
    # the model a folder was collected with (its collect.json) names the estimator; two models are refused
    gen = torch.Generator().manual_seed(0)
    for name, model in (("m1", "org/tuned-135m"), ("m2", "org/other-135m")):
        (tmp_path / name).mkdir()
        exs = [CollectedExample(f"{name}-{i}", torch.rand(1, 3, 270, generator=gen), torch.rand(32, 3, generator=gen)
                                < 0.5, torch.randn(1, 32, generator=gen), torch.rand(1), {"id": f"{name}-{i}"})
               for i in range(8)]
        write_shard(tmp_path / name / "shard-r00-1-a.safetensors", exs)
        (tmp_path / name / "collect.json").write_text(json.dumps({"model": model}))
    code, _, err = run_main(capsys, "train", str(tmp_path / "m1"), str(tmp_path / "m2"), str(tmp_path / "est"))
    assert code == 2 and "collected with other models" in err and "org/other-135m" in err, err
    code, _, err = run_main(capsys, "train", str(tmp_path / "m1"), str(tmp_path / "est"), "--model", "org/x")
    assert code == 2 and "(--model org/x)" in err, err
    assert not (tmp_path / "est").exists()
    code, _, err = run_main(capsys, "train", str(tmp_path / "m1"), str(tmp_path / "est"), "--epochs", "2")
    assert code == 0, err
    assert json.loads((tmp_path / "est" / "config.json").read_text())["model_id"] == "org/tuned-135m"
    # --baseline belongs to the conversation evaluation, and its folders name the results
    code, _, err = run_main(capsys, "evaluate", str(shards), "--baseline", str(shards))
    assert code == 2 and "--baseline needs --conversations" in err, err
    twins = ["--baseline", str(tmp_path / "x" / "est"), "--baseline", str(tmp_path / "y" / "est")]
    code, _, err = run_main(capsys, "evaluate", str(shards), "--conversations", *twins)
    assert code == 2 and "must have different names" in err, err
    # options the conversation evaluation would ignore are refused, not silently dropped (--part would make
    # every process evaluate everything), before the model loads
    code, _, err = run_main(capsys, "evaluate", str(shards), "--conversations", "--part", "0/2", "--seed", "3")
    assert code == 2 and "--part, --seed: single-turn evaluation options, not used by --conversations" in err, err
    code, _, err = run_main(capsys, "evaluate", "--merge", str(shards), "--conversations")
    assert code == 2 and "--merge: single-turn evaluation options" in err, err
    part = tmp_path / "part.json"
    part.write_text("{not json")
    code, _, err = run_main(capsys, "evaluate", "--merge", str(part))
    assert code == 2 and "part.json:1 is not valid JSON" in err
    code, _, err = run_main(capsys, "evaluate", "--merge", str(_latin1_jsonl(tmp_path)))
    assert code == 2 and "latin1.jsonl:2 is not UTF-8 text" in err
    for bad_part in ("1/x", "2/2"):
        code, _, err = run_main(capsys, "evaluate", str(part), "--part", bad_part)
        assert code == 2 and "--part must be K/N" in err


def test_a_shard_with_foreign_metadata_is_named(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "shard-x.safetensors"), metadata={"examples": "{}"})
    with pytest.raises(InputFileError, match="shard-x.safetensors is not an at2-rag shard"):
        completed_ids(tmp_path)


def test_the_process_exits_2_with_one_line_and_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "at2_rag.cli", "attribute", "--query", "q", "--documents",
                           str(_binary(tmp_path))], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("at2-rag: error: cannot read ") and "Traceback" not in done.stderr


def test_readers_raise_input_file_errors_with_path_and_line(tmp_path):
    path = _latin1_jsonl(tmp_path)
    with pytest.raises(InputFileError) as exc:
        read_documents(path)
    assert exc.value.path == path and exc.value.line == 2 and isinstance(exc.value, InvalidInputError)
    # a BOM is not content, and U+2028 inside a JSON string does not split the line
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "a\u2028b"}, ensure_ascii=False).encode() + b"\r\n")
    assert read_documents(bom) == [{"text": "a\u2028b"}]
    assert [(r.line, r.problem) for r in read_jsonl(bom)] == [(1, None)]
    with pytest.raises(InvalidInputError, match="holds no documents"):
        read_documents(write_jsonl(tmp_path / "blank.jsonl", ["", "  "]))
