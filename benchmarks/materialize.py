"""Per-candidate materialization time of the in-memory path vs copying weights and vs disk.

Builds a ~100M-parameter Llama-shaped base and two fine-tunes (fp32: what a CPU worker scores
in; `--dtype bfloat16` for the storage dtype of real checkpoints) under benchmarks/work/, then for
ties, dare_ties and della measures, with one torch thread (as in a CPU worker):

- `materialize`: `Materializer.apply` of a fresh candidate (new densities and weights, the run's
  mask seed, as a search uses by default) into the resident model, after a warm-up that built the
  resident task-vector caches, the mask draws and the compiled kernels (the one-time cost is
  reported as `precompute_seconds`); `new_seed_seconds` is a candidate with a fresh mask seed
  (DARE/DELLA draw their uniforms again: a search with `mask_seed: candidate`);
- `copy`: one `copy_` of every weight of the same model from resident tensors (`ratio_vs_copy`,
  target <= 4);
- `disk`: `evomerge merge` of the same recipe into a directory (in process, so no interpreter
  start-up is counted) plus `from_pretrained` of the result (`speedup_vs_disk`, target >= 20).

    .venv/bin/python benchmarks/materialize.py [--candidates 5] [--disk-repeats 2] [--dtype float32]
"""

from __future__ import annotations

import argparse
import gc
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
METHODS = ("ties", "dare_ties", "della")


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


def recipe(method: str, paths: dict[str, Path], variant: int) -> dict:
    """Candidate `variant` of `method`: per-model weights and densities move with the variant, the
    way successive CMA-ES samples do."""
    shift = 0.05 * variant
    extra = {"epsilon": 0.1} if method == "della" else {}
    return {
        "merge_method": method,
        "base_model": str(paths["base"]),
        # the kernels rescale by 1/keep-probability; mergekit's default L1 matching runs eager
        **({"parameters": {"rescale_norm": "inverse"}} if method in ("dare_ties", "della") else {}),
        "models": [
            {"model": str(paths["ft1"]), "parameters": {"weight": 0.6 + shift, "density": [0.3 + shift, 0.6], **extra}},
            {"model": str(paths["ft2"]), "parameters": {"weight": 0.5 - shift / 2, "density": 0.5 - shift, **extra}},
        ],
    }


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=5, help="timed candidates per method")
    parser.add_argument("--disk-repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--kernels", default="auto", choices=("auto", "compiled", "eager"))
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    from evomerge.candidates.materialize import Materializer
    from evomerge.merge.methods.registry import REGISTRY

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    paths = make_models(WORK / f"materialize-{args.dtype}", args.dtype)
    started = time.perf_counter()
    materializer = Materializer(list(paths.values()), kernels=args.kernels)
    load_seconds = time.perf_counter() - started
    figures: dict = {
        "model": {**SHAPE, "dtype": args.dtype},
        "threads": args.threads,
        "kernels": args.kernels,
        "candidates": args.candidates,
        "load_seconds": load_seconds,
        "methods": {},
    }
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="materialize-", dir=WORK))
    try:
        for method in [m for m in args.methods.split(",") if m]:
            started = time.perf_counter()
            built = materializer.apply(recipe(method, paths, 0), seed=1)  # warm-up: caches, target model
            precompute = time.perf_counter() - started
            times = []
            for i in range(1, args.candidates + 1):
                started = time.perf_counter()
                built = materializer.apply(recipe(method, paths, i), seed=1)
                times.append(time.perf_counter() - started)
            materialize = statistics.median(times)
            new_seed = None
            if REGISTRY[method].random:  # a seed never drawn before (draws are shared by methods, per seed)
                started = time.perf_counter()
                materializer.apply(recipe(method, paths, 1), seed=1000 + len(figures["methods"]))
                new_seed = time.perf_counter() - started
            params = sum(p.numel() for p in built.model.parameters())
            copy = time_copy(built.model, materializer.resident(str(paths["base"])).tensors, args.candidates)
            disk = time_disk(method, paths, args.disk_repeats, scratch)
            figures["methods"][method] = {
                "materialize_seconds": materialize,
                "materialize_all": times,
                "copy_seconds": copy,
                "disk_seconds": disk,
                "precompute_seconds": precompute,
                "new_seed_seconds": new_seed,
                "ratio_vs_copy": materialize / copy,
                "speedup_vs_disk": disk / materialize,
                "parameters": params,
                "target_ratio_vs_copy_le_4": materialize / copy <= 4,
                "target_speedup_vs_disk_ge_20": disk / materialize >= 20,
            }
            rows.append(
                [
                    method,
                    f"{params / 1e6:.1f}M",
                    materialize,
                    copy,
                    materialize / copy,
                    disk,
                    disk / materialize,
                    precompute,
                    "-" if new_seed is None else new_seed,
                ]
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
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
    print_table(
        f"materialize ({args.dtype}, {args.threads} thread(s); seconds)",
        [
            "method",
            "params",
            "materialize",
            "copy_",
            "ratio_vs_copy",
            "disk+reload",
            "speedup_vs_disk",
            "precompute",
            "new_seed",
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
