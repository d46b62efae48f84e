"""Peak memory and per-candidate time of a search worker in each cache mode (full, budgeted, minimal).

Three sources (a ~100M-parameter random Llama base and two fine-tunes, as benchmarks/materialize.py
builds them; `--dtype bfloat16` for bf16 checkpoints) and, per (mode, method), a fresh
subprocess that:

1. imports everything and compiles the merge kernel on tiny models of the same family (so the
   compiler's own memory is not counted), then resets the kernel's peak-RSS mark
   (`/proc/self/clear_refs`, 5) and reads the baseline RSS;
2. builds `Materializer(sources, cache=mode, memory_budget=...)`, materialises one warm-up
   candidate (caches built), then `--candidates` fresh candidates (new weights and densities, the
   run's mask seed, as a search does);
3. reports the peak RSS above the baseline (VmHWM - baseline: sources, candidate target, caches
   and workspace) against the sources' bytes and against `sources + one candidate`, and the median
   materialization time.

Target (issue 15): minimal mode <= sources + one candidate + 10%.

    .venv/bin/python benchmarks/memory.py [--dtype float32] [--candidates 5] [--methods ties,dare_ties]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import materialize  # noqa: E402
from bench_util import RESULTS, WORK, machine, print_table  # noqa: E402
from materialize import make_models, recipe  # noqa: E402

# The figures in docs/memory.md were taken with DARE's inverse rescaling: the streamed modes run
# L1 jobs eager (a chunk cannot know the whole tensor's L1 norm), which would measure another thing.
materialize.RESCALE_NORM = "inverse"

MODES = ("full", "budgeted", "minimal")
METHODS = ("ties", "dare_ties")
TINY = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def tiny_models(root: Path, dtype: str) -> dict[str, Path]:
    """A tiny base and two fine-tunes of the same family and dtype: the kernel warm-up."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = {name: root / name for name in ("base", "ft1", "ft2")}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False)).to(getattr(torch, dtype))
    for i, path in enumerate(paths.values()):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.01 * i * torch.randn_like(param))
        model.save_pretrained(path)
    return paths


def child(mode: str, method: str, dtype: str, candidates: int, budget: int | None, threads: int) -> dict:
    """One measurement in this (fresh) process; returns the figures as a dict."""
    import ctypes
    import gc

    import torch
    from transformers.utils import logging as hf_logging

    from evomerge.candidates.materialize import Materializer, workspace_bytes
    from evomerge.io.allocator import keep_freed_memory

    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    keep_freed_memory()  # as FitnessWorker does
    tiny = tiny_models(WORK / f"memory-tiny-{dtype}", dtype)
    warm = Materializer(list(tiny.values()), kernels="compiled", cache=mode if mode != "budgeted" else "minimal")
    for i in range(2):
        warm.apply(recipe(method, tiny, i), seed=1)
    if mode == "budgeted":  # both kernel paths: cached and streamed
        cached = Materializer(list(tiny.values()), kernels="compiled")
        cached.fused._compiled = warm.fused.kernel()
        cached.apply(recipe(method, tiny, 0), seed=1)
        del cached
    kernel, magnitude = warm.fused.kernel(), warm.stream._compiled_magnitude()
    del warm
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    baseline = status_kb("VmRSS")

    paths = make_models(WORK / f"materialize-{dtype}", dtype)
    started = time.perf_counter()
    materializer = Materializer(list(paths.values()), cache=mode, memory_budget=budget)  # type: ignore[arg-type]
    materializer.fused._compiled, materializer.stream._magnitude = kernel, magnitude  # compiled in the warm-up
    load = time.perf_counter() - started
    started = time.perf_counter()
    built = materializer.apply(recipe(method, paths, 0), seed=1)
    first = time.perf_counter() - started
    times = []
    for i in range(1, candidates + 1):
        started = time.perf_counter()
        built = materializer.apply(recipe(method, paths, i), seed=1)
        times.append(time.perf_counter() - started)
    peak = status_kb("VmHWM") - baseline
    sources = materializer.resident_bytes
    candidate = built.plan.total_bytes
    return {
        "mode": mode,
        "method": method,
        "memory_budget": budget,
        "baseline_rss": baseline,
        "peak_above_baseline": peak,
        "sources_bytes": sources,
        "candidate_bytes": candidate,
        "target_bytes": materializer.target_bytes,
        "cache_bytes": materializer.pool.nbytes,
        "delta_cache_bytes": materializer.deltas.nbytes,
        "draw_cache_bytes": materializer.fused.draws.nbytes,
        "workspace_reserve_bytes": workspace_bytes(built.plan),
        "peak_over_sources": peak / sources,
        "peak_over_sources_plus_candidate": peak / (sources + candidate),
        "load_seconds": load,
        "first_candidate_seconds": first,
        "materialize_seconds": statistics.median(times),
        "materialize_all": times,
        "jobs_streamed": materializer.stream.jobs,
        "jobs_fused": materializer.fused.fused_jobs,
        "cache_misses": materializer.pool.misses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--candidates", type=int, default=5, help="timed candidates per (mode, method)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--budget-factor",
        type=float,
        default=2.0,
        help="budgeted mode: memory_budget = factor x (sources + one candidate)",
    )
    parser.add_argument("--child", nargs=2, metavar=("MODE", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        figures = child(*args.child, args.dtype, args.candidates, args.budget, args.threads)
        print("RESULT " + json.dumps(figures), flush=True)
        return

    paths = make_models(WORK / f"materialize-{args.dtype}", args.dtype)
    from safetensors import safe_open

    sources = 0
    for path in paths.values():
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            for name in f.keys():  # noqa: SIM118
                part = f.get_slice(name)
                sources += _numel(part.get_shape()) * _size(part.get_dtype())
    candidate = sources // len(paths)
    budget = int(args.budget_factor * (sources + candidate))
    results = []
    for method in [m for m in args.methods.split(",") if m]:
        for mode in [m for m in args.modes.split(",") if m]:
            command = [
                sys.executable,
                __file__,
                "--child",
                mode,
                method,
                "--dtype",
                args.dtype,
                "--candidates",
                str(args.candidates),
                "--threads",
                str(args.threads),
            ]
            if mode == "budgeted":
                command += ["--budget", str(budget)]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.exit(f"{mode}/{method} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(lines[-1].removeprefix("RESULT ")))
            r = results[-1]
            print(
                f"{method:9s} {mode:8s} peak {r['peak_above_baseline'] / 1e9:.2f} GB "
                f"({r['peak_over_sources_plus_candidate']:.2f}x sources+candidate), "
                f"{r['materialize_seconds']:.3f} s/candidate",
                flush=True,
            )
    rows = [
        [
            r["method"],
            r["mode"],
            "-" if r["memory_budget"] is None else f"{r['memory_budget'] / 1e9:.2f}",
            r["peak_above_baseline"] / 1e9,
            r["cache_bytes"] / 1e9,
            r["peak_over_sources"],
            r["peak_over_sources_plus_candidate"],
            r["materialize_seconds"],
            r["first_candidate_seconds"],
        ]
        for r in results
    ]
    print_table(
        f"memory ({args.dtype}; sources {sources / 1e9:.2f} GB, one candidate {candidate / 1e9:.2f} GB; "
        f"{args.threads} thread(s))",
        [
            "method",
            "mode",
            "budget GB",
            "peak GB",
            "caches GB",
            "peak/sources",
            "peak/(src+cand)",
            "s/candidate",
            "first s",
        ],
        rows,
    )
    minimal = [r for r in results if r["mode"] == "minimal"]
    target = all(r["peak_over_sources_plus_candidate"] <= 1.10 for r in minimal)
    figures = {
        "benchmark": "memory",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "dtype": args.dtype,
        "threads": args.threads,
        "candidates": args.candidates,
        "budget_factor": args.budget_factor,
        "sources_bytes": sources,
        "candidate_bytes": candidate,
        "target_minimal_le_sources_plus_candidate_plus_10pct": target if minimal else None,
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "memory.json" if args.dtype == "float32" else f"memory-{args.dtype}.json"
    (RESULTS / name).write_text(json.dumps(figures, indent=2) + "\n")
    print(f"minimal <= sources + candidate + 10%: {target}; written: {RESULTS / name}")


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _size(code: str) -> int:
    return {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(code, 4)


if __name__ == "__main__":
    main()
