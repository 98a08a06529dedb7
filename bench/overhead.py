"""Overhead of attribution during generation: `Attributor.generate` vs plain `model.generate`.

Same prompt, same greedy tokens, at ~200, ~2k and ~6k prompt tokens. Time: both variants alternate in one
process on one model instance (stock sdpa for plain runs, the capturing implementation for attributed ones;
median of --reps runs, after a warm-up, the first variant swapped every run). Peak memory: each variant runs in
fresh subprocesses that report their peak resident set size and glibc's heap totals at the prefill's end; the
figure uses a fixed mmap threshold (peak RSS then follows live memory), glibc's defaults are reported beside it.
Prints ratios; writes JSON and a plot.

    python bench/overhead.py [--sizes 200 2000 6000] [--new-tokens 64] [--reps 5] [--mem-reps 3]
                             [--default-malloc-reps 4] [--mmap-threshold BYTES] [--out docs/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import ROOT, conversation_history, documents_for  # bench/_common.py (this script's folder)

from at2_rag.capture.attention import attention_implementation, install_capture

PHASES: list[dict[str, float]] = []  # where the capture path's time goes, per run
#: `--conversation`: earlier turns before the question, so the capture also reduces against the history, the
#: system prompt and the question (every context source a conversation has)
HISTORY: list[dict[str, str]] = []


def load(capture: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from at2_rag import Attributor
    from at2_rag.models import DEFAULT_MODEL_ID, default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    model.config._name_or_path = DEFAULT_MODEL_ID
    attributor = Attributor(model, tokenizer) if capture else None
    return model, tokenizer, attributor


def run_once(model, tokenizer, attributor, query, docs, new_tokens, implementation="sdpa"):
    """One generation; returns (seconds, generated token ids, prompt tokens)."""
    if attributor is None:  # plain generation on the identical prompt text, rendered by the same code
        from at2_rag.prompting.render import PromptTemplate, render_prompt
        from at2_rag.prompting.sources import normalize_documents

        model.set_attn_implementation(implementation)  # stock sdpa: nothing of at2-rag in the forward pass
        prompt = render_prompt(tokenizer, query, normalize_documents(docs), PromptTemplate(), history=HISTORY)
        t = time.perf_counter()  # a plain pipeline tokenizes its prompt text too: that much of rendering is not extra
        ids = tokenizer(prompt.text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert ids[0].tolist() == prompt.input_ids, "plain tokenization differs from the rendered prompt's tokens"
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                pad_token_id=tokenizer.eos_token_id,
            )
        return time.perf_counter() - t, out[0, ids.shape[1]:].tolist(), ids.shape[1]
    install_capture(model)  # what Attributor.generate does on its first call (outside the timer: a toggle)
    t0 = time.perf_counter()
    # chat template, tokenization, sentence splitting, the context-window check
    prepared = attributor.prepare(query, docs, history=HISTORY, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    t1 = time.perf_counter()
    run = attributor.run(prepared)  # generation with capture
    t2 = time.perf_counter()
    # answer sentences, estimator, result objects: zero-pass scoring (groundedness "estimated", as when the numbers
    # in docs/benchmarks.md were recorded; measured groundedness's extra pass is bench/groundedness_cost.py's)
    attributor.score(run)
    t3 = time.perf_counter()
    PHASES.append({"render": t1 - t0, "generate": t2 - t1, "attribute": t3 - t2,
                   "implementation": attention_implementation(model)})
    return t3 - t0, run.answer.token_ids, run.prompt.num_tokens


def _clocked(fn, clock: dict, key: str):
    """`fn`, adding the seconds each call takes to `clock[key]`."""

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[key] += time.perf_counter() - t

    return timed


def capture_work(model, tokenizer, attributor, query, docs, new_tokens) -> dict[str, float]:
    """Seconds of capture's own work in one attributed generation, clocked where it happens.

    End-to-end differences on a shared VM swing by several % between identical runs; this accounting does not
    depend on them. `at2_rag.capture.attention.timed_capture` clocks (a) the capturing attention calls minus the stock
    kernel they delegate to (the per-call bookkeeping of every prefill and decode step), less the clocks' own
    cost and less the release of the cache's previous key tensor (a free that plain generation performs too,
    inside the cache update; with capture the last reference to it is dropped in the attention call), and (b)
    the read: softmax rows and source sums at the end. The clocks' cost is measured where it arises: the same
    clocks around a pass-through to the stock kernel, registered through transformers' public
    `AttentionInterface.register`, in a plain generation of the same prompt and tokens (in place, right after the
    model has streamed its weights through the caches, a clock costs several times what it costs in a tight
    loop). Instrumented runs, outside the timed ones.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from at2_rag.capture.attention import CaptureTimings, attention_implementation, timed_capture

    probe_clock = {"wrapper": 0.0, "kernel": 0.0}
    probe_calls = [0]
    kernel = _clocked(ALL_ATTENTION_FUNCTIONS["sdpa"], probe_clock, "kernel")

    def counted(*args, **kwargs):
        probe_calls[0] += 1
        return kernel(*args, **kwargs)

    probe = "at2_bench_clock_probe"
    AttentionInterface.register(probe, _clocked(counted, probe_clock, "wrapper"))
    AttentionMaskInterface.register(probe, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    try:
        model.set_attn_implementation(probe)
        _, plain_tokens, _ = run_once(model, tokenizer, None, query, docs, new_tokens, implementation=probe)
    finally:
        model.set_attn_implementation("sdpa")
    clocks_cost = probe_clock["wrapper"] - probe_clock["kernel"]

    install_capture(model)
    assert attention_implementation(model).startswith("at2_capture_")
    timings = CaptureTimings()
    try:
        with timed_capture(timings):
            _, tokens, _ = run_once(model, tokenizer, attributor, query, docs, new_tokens)
    finally:
        PHASES.pop()
    assert tokens == plain_tokens and timings.calls == probe_calls[0], "instrumented runs differ"
    return {
        "bookkeeping": timings.attention - timings.kernel - timings.release - clocks_cost,
        "read": timings.read,
        "calls": timings.calls,
        "clocks_cost": clocks_cost,
        "key_release": timings.release,
    }


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def child(mode: str, size: int, new_tokens: int) -> None:
    """Subprocess entry: one generation of one variant, printing seconds, peak RSS and the heap at the prefill's end."""
    model, tokenizer, attributor = load(mode == "capture")
    query, docs = documents_for(tokenizer, size)
    run_once(model, tokenizer, attributor, query, docs[:2], 4)  # warm-up on a short prompt
    heap: dict[str, float] = {}

    def after_prefill(module, args, output):  # the first lm_head call ends the prefill, where the peak falls
        if not heap:
            heap.update(_heap_mb())

    hook = model.lm_head.register_forward_hook(after_prefill)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark: measure generation, not loading
    before = _status_mb("VmRSS")
    seconds, tokens, prompt_tokens = run_once(model, tokenizer, attributor, query, docs, new_tokens)
    hook.remove()
    impl = attention_implementation(model)
    peak = _status_mb("VmHWM")
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "rss_before_mb": before, "impl": impl,
                      "prompt_tokens": prompt_tokens, "tokens": tokens, "heap_at_prefill_end": heap}))


def _heap_mb() -> dict[str, float]:
    """glibc's malloc totals (`mallinfo2`): bytes in use vs free inside the heap, in MB; empty elsewhere."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {}
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    mb = 1 << 20
    return {"in_use_mb": (info.uordblks + info.hblkhd) / mb, "free_in_heap_mb": info.fordblks / mb,
            "heap_mb": info.arena / mb}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000, 6000])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--mem-reps", type=int, default=3,
                        help="fresh processes per variant for peak memory, with a fixed mmap threshold (the figure)")
    parser.add_argument("--default-malloc-reps", type=int, default=4,
                        help="more fresh processes per variant under glibc's default malloc settings (reported beside)")
    parser.add_argument(
        "--mmap-threshold", type=int, default=1 << 20,
        help="M_MMAP_THRESHOLD (bytes) for the --mem-reps processes: tensors this large get their own mapping, "
        "returned to the system when freed, so peak RSS follows live memory instead of the heap's layout",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    parser.add_argument("--conversation", action="store_true", help="two earlier turns before the question (writes "
                        "overhead-conversation.json / .png)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SIZE", "NEW"))
    args = parser.parse_args()
    if args.conversation:
        HISTORY.extend(conversation_history())
    if args.mem_reps < 1 or args.default_malloc_reps < 0:
        parser.error("--mem-reps must be at least 1 and --default-malloc-reps at least 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return

    # One model instance for both variants (its attention implementation switched between stock sdpa and the
    # capturing one before each run): two instances differ by a few % in speed on a CPU from memory placement alone.
    cap_model, tokenizer, attributor = load(True)
    plain_model = cap_model
    results = []
    for size in args.sizes:
        query, docs = documents_for(tokenizer, size)
        run_once(plain_model, tokenizer, None, query, docs, 4)
        run_once(cap_model, tokenizer, attributor, query, docs, 4)
        plain_t, cap_t = [], []
        PHASES.clear()
        for rep in range(args.reps):  # alternate, and swap who goes first, so drifting load hits both alike
            for variant in (("plain", "capture") if rep % 2 == 0 else ("capture", "plain")):
                if variant == "plain":
                    t, plain_tokens, n_prompt = run_once(plain_model, tokenizer, None, query, docs, args.new_tokens)
                    plain_t.append(t)
                else:
                    t, cap_tokens, _ = run_once(cap_model, tokenizer, attributor, query, docs, args.new_tokens)
                    cap_t.append(t)
        phases = {k: statistics.median(p[k] for p in PHASES[-args.reps:]) for k in ("render", "generate", "attribute")}
        impls = {p["implementation"] for p in PHASES}
        assert impls == {"at2_capture_sdpa"}, f"capture ran with {impls}"
        impl = impls.pop()
        work = capture_work(cap_model, tokenizer, attributor, query, docs, args.new_tokens)
        text = attributor.render(query, docs, history=HISTORY).text
        def plain_tokenize(text: str = text) -> None:
            tokenizer(text, add_special_tokens=False)

        work["plain_tokenize"] = statistics.median(_seconds(plain_tokenize) for _ in range(3))
        # rendering beyond the tokenization a plain pipeline does too, bookkeeping, read, building the result
        extra = work["bookkeeping"] + work["read"] + phases["render"] - work["plain_tokenize"] + phases["attribute"]
        mem = peak_memory(size, args.new_tokens, args.mem_reps, {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)})
        default_mem = peak_memory(size, args.new_tokens, args.default_malloc_reps, {})
        row = {
            "prompt_tokens": n_prompt,
            "new_tokens": args.new_tokens,
            "plain_seconds": statistics.median(plain_t),
            "capture_seconds": statistics.median(cap_t),
            "time_ratio": statistics.median(cap_t) / statistics.median(plain_t),
            "best_time_ratio": min(cap_t) / min(plain_t),  # least disturbed run of each: robust to load spikes
            # each run against the other variant's run beside it: slow drifts of a shared machine cancel
            "paired_time_ratio": statistics.median(c / p for c, p in zip(cap_t, plain_t)),
            "plain_seconds_all": plain_t,
            "capture_seconds_all": cap_t,
            "capture_phase_seconds": phases,
            "generation_only_time_ratio": phases["generate"] / statistics.median(plain_t),
            "capture_work_seconds": work,
            # render + bookkeeping + read + result, against plain generation: the overhead, clocked directly
            "accounted_time_ratio": 1 + extra / statistics.median(plain_t),
            # the same work against the fastest plain run: the figure a quieter machine would give
            "accounted_vs_fastest_ratio": 1 + extra / min(plain_t),
            "same_tokens": plain_tokens == cap_tokens
            and all(m[v]["tokens"] in (None, plain_tokens) for m in (mem, default_mem) for v in m),
            "plain_peak_rss_mb": mem["plain"]["peak_rss_mb"],
            "capture_peak_rss_mb": mem["capture"]["peak_rss_mb"],
            "memory_ratio": mem["capture"]["peak_rss_mb"] / mem["plain"]["peak_rss_mb"],
            "plain_generation_growth_mb": mem["plain"]["peak_rss_mb"] - mem["plain"]["rss_before_mb"],
            "capture_generation_growth_mb": mem["capture"]["peak_rss_mb"] - mem["capture"]["rss_before_mb"],
            "mmap_threshold": args.mmap_threshold,
            "peak_memory": mem,  # every process: peak RSS, heap in use / free at the prefill's end
            "default_malloc_peak_memory": default_mem,
            "attention_implementation": impl,
        }
        results.append(row)
        print(
            f"prompt {n_prompt:>5} tok: time x{row['time_ratio']:.3f} (best-of x{row['best_time_ratio']:.3f}; "
            f"{row['plain_seconds']:.2f}s -> {row['capture_seconds']:.2f}s; "
            f"generation alone x{row['generation_only_time_ratio']:.3f}; accounted x{row['accounted_time_ratio']:.4f}, "
            f"vs fastest plain x{row['accounted_vs_fastest_ratio']:.4f}), peak RSS x{row['memory_ratio']:.3f} "
            f"({row['plain_peak_rss_mb']:.0f} -> {row['capture_peak_rss_mb']:.0f} MB; glibc defaults, each process: "
            f"{[round(v) for v in default_mem['plain']['all']]} -> "
            f"{[round(v) for v in default_mem['capture']['all']]}), "
            f"same tokens: {row['same_tokens']}",
            flush=True,
        )
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "overhead-conversation" if HISTORY else "overhead"
    sources = "system, earlier turns, question" if HISTORY else "system, question"
    setup = {"history": HISTORY, "context_sources": sources}
    (args.out / f"{name}.json").write_text(json.dumps({"machine": machine, **setup, "results": results}, indent=2))
    plot(results, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.json and {name}.png\n")
    print(markdown_table(results))
    print()
    print(memory_table(results))


def peak_memory(size: int, new_tokens: int, reps: int, env: dict[str, str]) -> dict[str, dict]:
    """Each variant's peak RSS over `reps` fresh processes (alternating), with glibc's malloc tuned by `env`.

    With glibc's defaults, mmap's threshold rises to the size of the first large block freed, after which the
    prefill's temporaries share the heap with the KV cache; whether each layer then leaves a K-sized hole (as
    we read it, posix_memalign's padding keeps a freed block from fitting the next request of its size) depends
    on the heap's state before the prompt, and identical processes of either variant peak ~140 MB apart at 6k
    tokens.
    """
    runs: dict[str, list[dict]] = {"plain": [], "capture": []}
    for _ in range(reps):
        for mode in runs:
            out = subprocess.run(
                [sys.executable, __file__, "--threads", str(torch.get_num_threads()), "--child", mode, str(size),
                 str(new_tokens)] + (["--conversation"] if HISTORY else []),
                capture_output=True, text=True, check=True, cwd=ROOT, env={**os.environ, **env},
            )
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        mode: {
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs) if rs else None,
            "rss_before_mb": statistics.median(r["rss_before_mb"] for r in rs) if rs else None,
            "tokens": rs[0]["tokens"] if rs else None,
            "all": [r["peak_rss_mb"] for r in rs],
            "heap_at_prefill_end": [r["heap_at_prefill_end"] for r in rs],
            "env": env,
        }
        for mode, rs in runs.items()
    }


def markdown_table(results: list[dict]) -> str:
    """The results as the table in docs/benchmarks.md."""
    lines = [
        "| prompt tokens | plain generate | with attribution | extra time (median) | extra time (best-of) "
        "| extra time (paired) | extra time (accounted) | accounted vs fastest plain | plain peak RSS "
        "| with attribution | extra peak | same tokens |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['prompt_tokens']} | {r['plain_seconds']:.2f} s | {r['capture_seconds']:.2f} s "
            f"| {100 * (r['time_ratio'] - 1):+.1f} % | {100 * (r['best_time_ratio'] - 1):+.1f} % "
            f"| {100 * (r['paired_time_ratio'] - 1):+.1f} % | {100 * (r['accounted_time_ratio'] - 1):+.2f} % "
            f"| {100 * (r['accounted_vs_fastest_ratio'] - 1):+.2f} % "
            f"| {r['plain_peak_rss_mb']:.0f} MB "
            f"| {r['capture_peak_rss_mb']:.0f} MB | {100 * (r['memory_ratio'] - 1):+.1f} % "
            f"| {'yes' if r['same_tokens'] else 'NO'} |"
        )
    return "\n".join(lines)


def memory_table(results: list[dict]) -> str:
    """Every memory process, for docs/benchmarks.md: peak RSS and the heap in use at the prefill's end."""

    def each(values: list[float]) -> str:
        return " / ".join(f"{v:.0f}" for v in values)

    def in_use(mem: dict, variant: str) -> str:  # heap totals are empty where the C library is not glibc
        values = [h["in_use_mb"] for h in mem[variant]["heap_at_prefill_end"] if h]
        return f"{statistics.median(values):.0f}" if values else "n/a"

    lines = [
        "| prompt tokens | fixed mmap threshold: plain peak RSS (each process) | with attribution | extra peak "
        "| heap in use at prefill end, plain -> with attribution | glibc defaults: plain peak RSS (each process) "
        "| with attribution |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        mem, default = r["peak_memory"], r["default_malloc_peak_memory"]
        lines.append(
            f"| {r['prompt_tokens']} | {each(mem['plain']['all'])} MB | {each(mem['capture']['all'])} MB "
            f"| {100 * (r['memory_ratio'] - 1):+.1f} % "
            f"| {in_use(mem, 'plain')} -> {in_use(mem, 'capture')} MB "
            f"| {each(default['plain']['all'])} MB | {each(default['capture']['all'])} MB |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    from matplotlib.ticker import NullFormatter

    from at2_rag.plotting import pyplot, save_figure

    plt = pyplot()
    x = [r["prompt_tokens"] for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    panels = [("time_ratio", 2, "extra time (%)", "generate with attribution vs plain"),
              ("memory_ratio", 5, "extra peak RSS (%)", "peak resident memory")]
    for ax, (key, target, ylabel, title) in zip(axes, panels):
        label = "end to end (median)" if key == "time_ratio" else "fixed mmap threshold (median)"
        ax.plot(x, [100 * (r[key] - 1) for r in results], "o-", label=label)
        if key == "time_ratio":
            accounted = [100 * (r["accounted_time_ratio"] - 1) for r in results]
            ax.plot(x, accounted, "s-", label="capture's own work, clocked")
        elif all(r["default_malloc_peak_memory"]["plain"]["all"] for r in results):
            defaults = [r["default_malloc_peak_memory"] for r in results]
            ratios = [m["capture"]["peak_rss_mb"] / m["plain"]["peak_rss_mb"] for m in defaults]
            ax.plot(x, [100 * (v - 1) for v in ratios], "x:", label="glibc defaults (median)")
        ax.axhline(target, color="r", ls="--", lw=1, label=f"target +{target}%")
        ax.set(xlabel="prompt tokens", ylabel=ylabel, title=title, xscale="log")
        ax.set_xticks(x, [str(v) for v in x])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
