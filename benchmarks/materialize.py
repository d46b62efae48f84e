"""Per-candidate materialization time against each method's own memory floor, and vs disk.

Builds a ~100M-parameter Llama-shaped base and two fine-tunes (fp32: what a CPU worker scores
in; `--dtype bfloat16` for the storage dtype of real checkpoints) under benchmarks/work/, then for
ties, dare_ties, dare_linear, della, breadcrumbs, task_arithmetic, linear and slerp (DARE/DELLA
with mergekit's L1 rescaling unless `--rescale-norm inverse`) measures, per torch thread count
(`--threads 1,2`):

- `materialize`: median over `--candidates` of `Materializer.apply` of a fresh candidate (new
  densities and weights, the run's mask seed, as a search uses by default) into the resident
  model, after a warm-up that built the resident task-vector caches, the mask draws and the
  compiled kernels (reported as `precompute_seconds`); `new_seed_seconds` is a candidate with a
  fresh mask seed (DARE/DELLA draw their uniforms again: `mask_seed: candidate`);
- the floor: `floor_bytes` (what the method must read and write per output element in the cached
  path, in the actual dtypes) x parameters / the bandwidth of one `copy_` of the same weights
  (8 B per element) measured at that thread count; `ratio_vs_floor` (target <= 1.5);
- `disk`: `evomerge merge` of the same recipe into a directory (in process, so no interpreter
  start-up is counted) plus `from_pretrained` of the result (`speedup_vs_disk`, target >= 20).

    .venv/bin/python benchmarks/materialize.py [--methods ties,...] [--threads 1,2] [--candidates 5]
        [--disk-repeats 1] [--dtype float32] [--rescale-norm l1|inverse] [--no-dfs]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_util import WORK, print_table, write_result  # noqa: E402

SHAPE = {
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 8,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
}
METHODS = ("ties", "dare_ties", "dare_linear", "della", "breadcrumbs", "task_arithmetic", "linear", "slerp")
FUSED = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "della", "della_linear"}


def dfs_recipe(paths: dict[str, Path], variant: int) -> dict:
    """A 12-step layer path alternating between base and ft1 with transition scales (as decoded
    from a DFS genome): materialised by binding resident layers, not by merging."""
    from evomerge.search.space.dfs import Step, path_to_recipe

    models = [str(paths["base"]), str(paths["ft1"])]
    steps = [Step(0, 0)]
    for i in range(1, 12):
        model, layer = i % 2, min(7, (i + variant) % 8)
        steps.append(
            Step(model, layer, 1.0 + 0.1 * ((i + variant) % 3)) if model != steps[-1].model else Step(model, layer)
        )
    return path_to_recipe(steps, models, ("o_proj", "down_proj")).model_dump(mode="json", exclude_none=True)


def make_models(root: Path, dtype: str) -> dict[str, Path]:
    """A random base and two fine-tunes (base + 1% noise), saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = {name: root / name for name in ("base", "ft1", "ft2")}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    config = LlamaConfig(**SHAPE, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(paths["base"])
    for seed, name in enumerate(("ft1", "ft2"), start=1):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, param in model.state_dict().items():
                noise = torch.randn(param.shape, generator=generator).to(param.dtype)
                param.copy_(base[key] + 0.01 * param.abs().mean() * noise)
        model.save_pretrained(paths[name])
    return paths


RESCALE_NORM = "l1"  # DARE/DELLA rescaling: mergekit's default (l1), or inverse (--rescale-norm)


def recipe(method: str, paths: dict[str, Path], variant: int) -> dict:
    """Candidate `variant` of `method`: per-model weights and densities move with the variant, the
    way successive CMA-ES samples do. DARE/DELLA use `RESCALE_NORM` (default: mergekit's L1)."""
    shift = 0.05 * variant
    ft1, ft2 = str(paths["ft1"]), str(paths["ft2"])
    if method == "linear":
        return {
            "merge_method": "linear",
            "models": [
                {"model": ft1, "parameters": {"weight": [0.6 + shift, 0.4]}},
                {"model": ft2, "parameters": {"weight": 0.5 - shift / 2}},
            ],
        }
    if method == "slerp":
        return {
            "merge_method": "slerp",
            "base_model": ft1,
            "parameters": {"t": [0.2 + shift, 0.7]},
            "models": [{"model": ft1}, {"model": ft2}],
        }
    extra: dict = {"epsilon": 0.1} if method == "della" else {}
    extra |= {"gamma": 0.01} if method == "breadcrumbs" else {}
    density = method != "task_arithmetic"
    return {
        "merge_method": method,
        "base_model": str(paths["base"]),
        **({"parameters": {"rescale_norm": RESCALE_NORM}} if method.startswith(("dare", "della")) else {}),
        "models": [
            {
                "model": ft1,
                "parameters": {"weight": 0.6 + shift, **({"density": [0.3 + shift, 0.6]} if density else {}), **extra},
            },
            {
                "model": ft2,
                "parameters": {"weight": 0.5 - shift / 2, **({"density": 0.5 - shift} if density else {}), **extra},
            },
        ],
    }


def floor_bytes(method: str, rank_bytes: int, inputs: int = 2) -> tuple[int, str]:
    """Bytes per output element the method must move in the cached path (fp32 sources, base,
    task vectors and draws fp32; output fp32), and how they add up. The finite check of the
    output (one more read, `run_plan`) is not part of the floor; the measured time includes it."""
    if method in ("task_arithmetic", "ties", "breadcrumbs"):
        return 4 + 4 * inputs + 4, f"base 4 + {inputs} task vectors x 4 + out 4"
    if method in ("dare_ties", "dare_linear", "della"):
        per = 8 + (rank_bytes if method == "della" else 0)  # task vector, draw (, rank)
        what = "task vector 4 + draw 4" + (f" + rank {rank_bytes}" if method == "della" else "")
        if RESCALE_NORM == "l1":  # `after` needs this candidate's mask before any output: one more read
            return 4 + 2 * per * inputs + 4, f"base 4 + {inputs} x 2 x ({what}) + out 4 (L1: mask read twice)"
        return 4 + per * inputs + 4, f"base 4 + {inputs} x ({what}) + out 4"
    if method == "linear":
        return 4 * inputs + 4, f"{inputs} models x 4 + out 4"
    if method == "slerp":
        return 2 * 4 + 2 * 4 + 4, "2 models x 4 (norms, dot) + 2 models x 4 + out 4"
    raise ValueError(method)


def time_copy(model, sources: dict, repeats: int) -> float:
    import torch

    targets = dict(model.named_parameters())
    pairs = [(targets[name], sources[name]) for name in targets if name in sources]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.no_grad():
            for target, source in pairs:
                target.copy_(source)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def time_disk(method: str, paths: dict[str, Path], repeats: int, scratch: Path) -> float:
    from transformers import AutoModelForCausalLM

    from evomerge.merge.recipe import dump_recipe, parse_recipe
    from evomerge.merge.runner import merge_from_file

    times = []
    for i in range(repeats):
        path = scratch / f"{method}{i}.yml"
        path.write_text(dump_recipe(parse_recipe(recipe(method, paths, i))))
        out = scratch / f"{method}{i}"
        started = time.perf_counter()
        merge_from_file(path, out, seed=100 + i, progress=False)
        model = AutoModelForCausalLM.from_pretrained(out)
        times.append(time.perf_counter() - started)
        del model
        shutil.rmtree(out)
        gc.collect()
    return statistics.median(times)


def main() -> None:
    global RESCALE_NORM
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=5, help="timed candidates per method")
    parser.add_argument("--disk-repeats", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--kernels", default="auto", choices=("auto", "compiled", "eager"))
    parser.add_argument("--rescale-norm", default="l1", choices=("l1", "inverse"), help="DARE/DELLA rescaling")
    parser.add_argument("--no-dfs", action="store_true")
    args = parser.parse_args()
    RESCALE_NORM = args.rescale_norm

    import torch
    from transformers.utils import logging as hf_logging

    from evomerge.candidates.materialize import Materializer
    from evomerge.io.allocator import keep_freed_memory
    from evomerge.merge.methods.registry import REGISTRY

    hf_logging.set_verbosity_error()
    keep_freed_memory()  # as the fitness worker does
    threads = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(threads[0])
    paths = make_models(WORK / f"materialize-{args.dtype}", args.dtype)
    started = time.perf_counter()
    materializer = Materializer(list(paths.values()), kernels=args.kernels)
    load_seconds = time.perf_counter() - started
    figures: dict = {
        "model": {**SHAPE, "dtype": args.dtype},
        "threads": threads,
        "kernels": args.kernels,
        "rescale_norm": args.rescale_norm,
        "candidates": args.candidates,
        "load_seconds": load_seconds,
        "load_average_start": list(os.getloadavg()),
        "methods": {},
    }
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="materialize-", dir=WORK))
    base_tensors = materializer.resident(str(paths["base"])).tensors
    try:
        for method in [m for m in args.methods.split(",") if m]:
            torch.set_num_threads(threads[0])
            started = time.perf_counter()
            built = materializer.apply(recipe(method, paths, 0), seed=1)  # warm-up: caches, target model
            precompute = time.perf_counter() - started
            params = sum(p.numel() for p in built.model.parameters())
            held = [entry[0] for entry in materializer.deltas.cache._entries.values()]  # the resident DeltaCaches
            ranks = [c.row_ranks for c in held if getattr(c, "row_ranks", None) is not None]
            rank_bytes = ranks[0].element_size() if ranks else 4
            per_element, what = floor_bytes(method, rank_bytes)
            disk = time_disk(method, paths, args.disk_repeats, scratch)
            entry: dict = {"parameters": params, "bytes_per_element": per_element, "bytes_detail": what}
            entry |= {"precompute_seconds": precompute, "disk_seconds": disk, "by_threads": {}}
            for count in threads:
                torch.set_num_threads(count)
                materializer.apply(recipe(method, paths, 0), seed=1)  # this thread count's first call
                times = []
                for i in range(1, args.candidates + 1):
                    started = time.perf_counter()
                    built = materializer.apply(recipe(method, paths, i), seed=1)
                    times.append(time.perf_counter() - started)
                materialize = statistics.median(times)
                copy = time_copy(built.model, base_tensors, max(args.candidates, 5))
                bandwidth = 8 * params / copy  # copy_ reads 4 B and writes 4 B per element
                floor = per_element * params / bandwidth
                new_seed = None
                if REGISTRY[method].random and count == threads[0]:  # a seed never drawn before
                    started = time.perf_counter()
                    materializer.apply(recipe(method, paths, 1), seed=1000 + len(figures["methods"]))
                    new_seed = time.perf_counter() - started
                entry["by_threads"][count] = {
                    "materialize_seconds": materialize,
                    "materialize_all": times,
                    "copy_seconds": copy,
                    "copy_gb_per_s": bandwidth / 1e9,
                    "floor_seconds": floor,
                    "ratio_vs_floor": materialize / floor,
                    "ratio_vs_copy": materialize / copy,
                    "speedup_vs_disk": disk / materialize,
                    "new_seed_seconds": new_seed,
                    "load_average": list(os.getloadavg()),
                    "target_ratio_vs_floor_le_1.5": materialize / floor <= 1.5,
                    "target_speedup_vs_disk_ge_20": disk / materialize >= 20,
                }
                rows.append(
                    [
                        method,
                        count,
                        per_element,
                        copy,
                        floor,
                        materialize,
                        materialize / floor,
                        disk,
                        disk / materialize,
                        precompute if count == threads[0] else "",
                        "-" if new_seed is None else new_seed,
                        "fused" if method in FUSED else "eager",
                    ]
                )
            figures["methods"][method] = entry
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not args.no_dfs:
        times = []
        for i in range(args.candidates):
            started = time.perf_counter()
            built = materializer.apply(dfs_recipe(paths, i))
            times.append(time.perf_counter() - started)
        assert built.mode == "stacked"
        figures["dfs_stacked"] = {
            "materialize_seconds": statistics.median(times),
            "materialize_all": times,
            "path_length": len(built.model.model.layers),
            "weights_copied_bytes": 0,
        }
        print(f"dfs layer path (12 steps, scales): {statistics.median(times) * 1000:.1f} ms per candidate, no copies")
    figures["resident_gb"] = materializer.resident_bytes / 1e9
    figures["delta_cache_gb"] = materializer.deltas.nbytes / 1e9
    figures["draw_cache_gb"] = materializer.fused.draws.nbytes / 1e9
    figures["fused_jobs"], figures["eager_jobs"] = materializer.fused.fused_jobs, materializer.fused.eager_jobs
    figures["load_average_end"] = list(os.getloadavg())
    print_table(
        f"materialize ({args.dtype}, DARE/DELLA rescale_norm {args.rescale_norm}; seconds, median of "
        f"{args.candidates}; load average {os.getloadavg()[0]:.2f})",
        [
            "method",
            "threads",
            "B/elem",
            "copy_",
            "floor",
            "materialize",
            "vs floor (<= 1.5)",
            "disk+reload",
            "speedup_vs_disk (>= 20)",
            "precompute",
            "new_seed",
            "path",
        ],
        rows,
    )
    print(
        f"resident sources {figures['resident_gb']:.2f} GB, task-vector caches {figures['delta_cache_gb']:.2f} GB, "
        f"mask draws {figures['draw_cache_gb']:.2f} GB; jobs fused {figures['fused_jobs']}, "
        f"eager {figures['eager_jobs']}"
    )
    print(f"written: {write_result('materialize', figures)}")


if __name__ == "__main__":
    main()
