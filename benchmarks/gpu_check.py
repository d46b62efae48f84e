"""The GPU check, in one command: kernels against the CPU reference, materialization against the
copy floor, search throughput and peak memory.

    python benchmarks/gpu_check.py                          # CUDA: ~1.1B bf16 Llama, base + 2 experts
    python benchmarks/gpu_check.py --device cpu --tiny      # the same code on CPU in seconds (slow tests)

Sections (each written to the JSON as soon as it is done, so a run cut short keeps what it measured):

- `equality`: every parameter-space method on the shipped mini zoo, merged by `evomerge merge` on
  the CPU (eager, the reference), by `evomerge merge --device cuda`, and built in memory on the
  device with `kernels=auto` (the flat pass at this size) and `kernels=compiled` (Triton): max |diff|
  of each against the device's eager merge and, for methods without random draws, against the CPU.
  DARE/DELLA masks come from the device's own generator, so only same-device comparisons are exact.
- `materialize`: per method, the median time of a fresh candidate on the big model (task vectors
  and draws resident after a warm-up) against the floor: the bytes its kernel must move per element
  (`BYTES`) at the bandwidth of a device-to-device `copy_` of the same weights.
- `search`: `--candidates` random TIES genomes (4 layer groups x density/weight per expert), each
  materialized and scored by greedy generation of `--new-tokens` tokens for a batch of prompts;
  evaluations/hour and the split of the time (materialize, generate, other).
- `memory`: peak device memory against sources + one candidate (+ the resident caches).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_util import RESULTS, WORK, machine, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MINI = ROOT / "zoo" / "mini"
BIG = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
)  # TinyLlama's shape: 1.1B parameters
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
)
FUSED = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "della", "della_linear")
TIMED = ("linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "della", "breadcrumbs")


def bytes_per_element(method: str, experts: int, source: int, out: int) -> int:
    """What a candidate's kernel must read and write per output element: the base (or each source)
    in its stored dtype, per expert the fp32 task vector and, for DARE/DELLA, its fp32 draw (DELLA
    also its fp32 row rank), and the output. Top-k thresholds are one scalar per tensor."""
    delta, draw, rank = 4, 4, 4
    per_expert = {"dare_ties": delta + draw, "dare_linear": delta + draw, "della": delta + draw + rank}
    if method == "linear":
        return experts * source + out
    if method == "slerp":
        return 2 * source + out
    return source + experts * per_expert.get(method, delta) + out


# -- recipes -------------------------------------------------------------------------------------


def mini_recipes() -> dict[str, dict]:
    base, add, rev, shift = (str(MINI / n) for n in ("base", "add", "rev", "shift"))
    density = [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": [0.2, 0.7]}, {"value": 0.5}]

    def task_vectors(method: str, **extra: Any) -> dict:
        sparse = method != "task_arithmetic"
        models = [
            {"model": add, "parameters": {"weight": 0.8, **({"density": density} if sparse else {}), **extra}},
            {"model": rev, "parameters": {"weight": [0.4, 0.9], **({"density": 0.6} if sparse else {}), **extra}},
            {"model": shift, "parameters": {"weight": 0.5, **({"density": 0.4} if sparse else {}), **extra}},
        ]
        return {"merge_method": method, "base_model": base, "models": models}

    return {
        "linear": {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": w}} for m, w in ((add, 0.5), (rev, [0.2, 0.8]))],
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": add}],
            "parameters": {"t": [0.1, 0.9]},
        },
        "task_arithmetic": task_vectors("task_arithmetic"),
        "ties": task_vectors("ties"),
        "dare_ties": task_vectors("dare_ties"),
        "dare_linear": task_vectors("dare_linear"),
        "breadcrumbs": task_vectors("breadcrumbs", gamma=0.05),
        "breadcrumbs_ties": task_vectors("breadcrumbs_ties", gamma=0.05),
        "della": task_vectors("della", epsilon=0.1),
        "della_linear": task_vectors("della_linear", epsilon=0.1),
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": [{"model": add}, {"model": rev}]},
        "passthrough": {"merge_method": "passthrough", "models": [{"model": add, "parameters": {"scale": 0.9}}]},
        "ties@bf16": {**task_vectors("ties"), "dtype": "bfloat16"},
        "della@bf16": {**task_vectors("della", epsilon=0.1), "dtype": "bfloat16"},
    }


def big_recipe(method: str, paths: dict[str, Path], variant: int) -> dict:
    """Candidate `variant` of `method`: values move with the variant, as successive samples do."""
    shift = 0.03 * variant
    experts = [str(paths["ft1"]), str(paths["ft2"])]
    if method == "linear":
        return {
            "merge_method": "linear",
            "models": [
                {"model": m, "parameters": {"weight": w}} for m, w in zip(experts, (0.6 + shift, 0.4), strict=True)
            ],
        }
    if method == "slerp":
        return {
            "merge_method": "slerp",
            "base_model": experts[0],
            "models": [{"model": experts[0]}, {"model": experts[1]}],
            "parameters": {"t": [0.2 + shift, 0.7]},
        }
    extra = {"epsilon": 0.1} if method.startswith("della") else {"gamma": 0.02} if method == "breadcrumbs" else {}
    densities = ({"density": [0.3 + shift, 0.6]}, {"density": 0.5 - shift}) if method != "task_arithmetic" else ({}, {})
    return {
        "merge_method": method,
        "base_model": str(paths["base"]),
        "models": [
            {"model": experts[0], "parameters": {"weight": 0.6 + shift, **densities[0], **extra}},
            {"model": experts[1], "parameters": {"weight": 0.5 - shift / 2, **densities[1], **extra}},
        ],
    }


def genome_recipe(rng: random.Random, paths: dict[str, Path], layers: int, groups: int = 4) -> dict:
    """A random PS genome (per layer group and expert: density, weight) written as a TIES recipe."""

    def per_group(low: float, high: float) -> list[dict]:
        size = math.ceil(layers / groups)
        return [
            {"filter": f"layers.{i}.", "value": round(rng.uniform(low, high), 4)}
            for g in range(groups)
            for i in range(g * size, min(layers, (g + 1) * size))
        ] + [{"value": round(rng.uniform(low, high), 4)}]

    return {
        "merge_method": "ties",
        "base_model": str(paths["base"]),
        "models": [
            {"model": str(paths[name]), "parameters": {"density": per_group(0.1, 1.0), "weight": per_group(0.0, 1.2)}}
            for name in ("ft1", "ft2")
        ],
    }


# -- helpers -------------------------------------------------------------------------------------


class Clock:
    """Wall time that waits for the device's queued work first."""

    def __init__(self, device: str):
        import torch

        self.sync: Callable[[], None] = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def __call__(self) -> float:
        self.sync()
        return time.perf_counter()


def max_diff(a: dict, b: dict) -> float:
    return max((a[n].double().cpu() - b[n].double().cpu()).abs().max().item() for n in a)


def file_merge(recipe: dict, out: Path, device: str, seed: int) -> dict:
    from safetensors.torch import load_file

    from evomerge.merge.recipe import dump_recipe, parse_recipe
    from evomerge.merge.runner import merge_from_file

    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yml"
    path.write_text(dump_recipe(parse_recipe(recipe)))
    merge_from_file(path, out, seed=seed, device=device, progress=False)
    state: dict = {}
    for file in sorted(out.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def written_state(model: Any, names: Any) -> dict:
    state = model.state_dict()
    return {n: state[n].detach().clone() for n in names}


def make_models(root: Path, shape: dict, device: str) -> dict[str, Path]:
    """A random bf16 base and two experts (base + 1% noise), built on the device and saved."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = {name: root / name for name in ("base", "ft1", "ft2")}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(paths["base"])
    for seed, name in enumerate(("ft1", "ft2"), start=1):
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for key, param in model.state_dict().items():
                noise = torch.randn(param.shape, generator=generator, device=device, dtype=torch.float32)
                param.copy_((base[key].float() + 0.01 * base[key].float().abs().mean() * noise).to(param.dtype))
        model.save_pretrained(paths[name])
    del model, base
    return paths


# -- sections ------------------------------------------------------------------------------------


def check_equality(device: str, scratch: Path, seed: int = 7) -> dict:
    from evomerge.candidates.materialize import Materializer

    sources = [MINI / n for n in ("base", "add", "rev", "shift")]
    auto = Materializer(sources, device=device, kernels="auto")
    compiled = Materializer(sources, device=device, kernels="compiled")
    results: dict[str, dict] = {}
    for label, recipe in mini_recipes().items():
        method = label.split("@")[0]
        tag = label.replace("@", "-")
        reference = file_merge(recipe, scratch / f"cpu-{tag}", "cpu", seed)
        on_device = reference if device == "cpu" else file_merge(recipe, scratch / f"dev-{tag}", device, seed)
        row: dict[str, Any] = {"random_draws": method.startswith(("dare", "della"))}
        if device != "cpu":
            row["device_merge_vs_cpu"] = max_diff(on_device, reference)
        row["auto_vs_device_merge"] = max_diff(written_state(auto.apply(recipe, seed=seed).model, on_device), on_device)
        if method in FUSED:
            built = compiled.apply(recipe, seed=seed).model
            row["compiled_vs_device_merge"] = max_diff(written_state(built, on_device), on_device)
            if not row["random_draws"]:
                row["compiled_vs_cpu"] = max_diff(written_state(built, on_device), reference)
        results[label] = row
    return {
        "methods": results,
        "flat_candidates": auto.flat.candidates,
        "compiled_jobs": compiled.fused.fused_jobs,
        "compiled_fallback_jobs": compiled.fused.eager_jobs,
        "kernels_disabled": compiled.fused.disabled,
    }


def time_copy(model: Any, sources: dict, clock: Clock, repeats: int) -> tuple[float, int]:
    import torch

    targets = dict(model.named_parameters())
    pairs = [(targets[n], sources[n]) for n in targets if n in sources]
    moved = sum(t.numel() * t.element_size() + s.numel() * s.element_size() for t, s in pairs)
    times = []
    for _ in range(repeats):
        started = clock()
        with torch.no_grad():
            for target, source in pairs:
                target.copy_(source)
        times.append(clock() - started)
    return statistics.median(times), moved


def check_materialize(materializer: Any, paths: dict, clock: Clock, candidates: int, deadline: float) -> dict:
    rows: dict[str, dict] = {}
    copy_seconds = moved = None
    for method in TIMED:
        if time.perf_counter() > deadline:
            rows[method] = {"skipped": "deadline"}
            continue
        started = clock()
        built = materializer.apply(big_recipe(method, paths, 0), seed=1)
        precompute = clock() - started
        times = []
        for i in range(1, candidates + 1):
            started = clock()
            built = materializer.apply(big_recipe(method, paths, i), seed=1)
            times.append(clock() - started)
        if copy_seconds is None:
            copy_seconds, moved = time_copy(built.model, materializer.resident(str(paths["base"])).tensors, clock, 5)
        params = sum(p.numel() for p in built.model.parameters())
        source_bytes = next(iter(built.model.parameters())).element_size()
        per_element = bytes_per_element(method, 2, source_bytes, source_bytes)
        bandwidth = moved / copy_seconds
        floor = params * per_element / bandwidth
        median = statistics.median(times)
        rows[method] = {
            "materialize_seconds": median,
            "materialize_all": times,
            "precompute_seconds": precompute,
            "bytes_per_element": per_element,
            "floor_seconds": floor,
            "ratio_vs_floor": median / floor,
            "mode": built.mode,
            "parameters": params,
        }
    return {
        "copy_seconds": copy_seconds,
        "copy_bandwidth_gb_s": None if copy_seconds is None else moved / copy_seconds / 1e9,
        "methods": rows,
        "fused_jobs": materializer.fused.fused_jobs,
        "eager_jobs": materializer.fused.eager_jobs,
    }


def check_search(materializer: Any, paths: dict, clock: Clock, args: argparse.Namespace, layers: int) -> dict:
    import torch

    rng = random.Random(0)
    device = materializer.device
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 500, (args.batch, args.prompt_tokens), generator=generator).to(device)
    targets = torch.randint(3, 500, (args.batch, args.new_tokens), generator=generator).to(device)
    split = {"materialize": 0.0, "generate": 0.0, "other": 0.0}
    scores = []
    started_all = clock()
    for _ in range(args.candidates):
        t0 = clock()
        recipe = genome_recipe(rng, paths, layers)
        t1 = clock()
        model = materializer.apply(recipe, seed=1).model
        t2 = clock()
        with torch.no_grad():
            out = model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        t3 = clock()
        scores.append((out[:, prompts.shape[1] :] == targets).all(dim=1).float().mean().item())
        t4 = clock()
        split["materialize"] += t2 - t1
        split["generate"] += t3 - t2
        split["other"] += (t1 - t0) + (t4 - t3)
    total = clock() - started_all
    return {
        "candidates": args.candidates,
        "batch": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "seconds": total,
        "evals_per_hour": args.candidates / total * 3600,
        "split_seconds": split,
        "split_fraction": {k: v / total for k, v in split.items()},
        "mean_score": statistics.mean(scores),
    }


def check_memory(materializer: Any, device: str, candidate_bytes: int) -> dict:
    """Peak memory against sources + one candidate (a candidate has the base's size and dtype)."""
    import torch

    figures = {
        "sources_gb": materializer.resident_bytes / 1e9,
        "candidate_gb": candidate_bytes / 1e9,
        "delta_cache_gb": materializer.deltas.nbytes / 1e9,
        "draw_cache_gb": materializer.fused.draws.nbytes / 1e9,
    }
    if device.startswith("cuda"):
        figures["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        figures["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    else:
        figures["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    floor = figures["sources_gb"] + figures["candidate_gb"]
    peak = figures.get("peak_allocated_gb", figures.get("peak_rss_gb"))
    figures["sources_plus_candidate_gb"] = floor
    figures["peak_over_sources_plus_candidate"] = peak / floor
    return figures


def check_minimal(paths: dict, args: argparse.Namespace, clock: Clock, deadline: float) -> dict:
    """`cache: minimal` (no caches; every task-vector tensor streamed into the live model): the time
    per candidate and the peak memory against sources + one candidate (docs/memory.md)."""
    import gc

    import torch

    from evomerge.candidates.materialize import Materializer

    gc.collect()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    materializer = Materializer(list(paths.values()), device=args.device, cache="minimal")
    figures: dict[str, Any] = {"methods": {}}
    for method in ("ties", "dare_ties"):
        if time.perf_counter() > deadline:
            figures["methods"][method] = {"skipped": "deadline"}
            continue
        materializer.apply(big_recipe(method, paths, 0), seed=1)  # compiles the streamed kernels
        times = []
        for i in range(1, args.timed + 1):
            started = clock()
            materializer.apply(big_recipe(method, paths, i), seed=1)
            times.append(clock() - started)
        figures["methods"][method] = {"materialize_seconds": statistics.median(times), "materialize_all": times}
    sources = materializer.resident_bytes
    candidate = materializer.resident(str(paths["base"])).nbytes
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    figures.update(
        sources_gb=sources / 1e9,
        candidate_gb=candidate / 1e9,
        peak_gb=peak / 1e9,
        peak_over_sources_plus_candidate=peak / (sources + candidate),
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 4-layer model instead of 1.1B (CPU tests)")
    parser.add_argument("--candidates", type=int, default=30, help="search candidates")
    parser.add_argument("--timed", type=int, default=5, help="timed candidates per method")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--deadline", type=float, default=420.0, help="seconds; later sections are skipped")
    parser.add_argument("--sections", default="equality,materialize,search,memory,minimal")
    parser.add_argument("--work", type=Path, default=None, help="where the models are built")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/)")
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    from evomerge.candidates.materialize import Materializer

    hf_logging.set_verbosity_error()
    began = time.perf_counter()
    deadline = began + args.deadline
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = args.out or RESULTS / f"gpu_check-{stamp}{'-tiny' if args.tiny else ''}-{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    info = machine(("torch", "transformers", "triton", "safetensors"))
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    shape = TINY if args.tiny else BIG
    report: dict[str, Any] = {"benchmark": "gpu_check", "date": stamp, "machine": info, "device": args.device}
    report["model"] = {**shape, "dtype": "bfloat16", "experts": 2}

    def save(section: str, figures: Any) -> None:
        report[section] = figures
        report["elapsed_seconds"] = time.perf_counter() - began
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"[{report['elapsed_seconds']:.0f}s] {section} done", flush=True)

    sections = args.sections.split(",")
    clock = Clock(args.device)
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=args.work or None) as tmp:
        scratch = Path(tmp)
        if "equality" in sections:
            save("equality", check_equality(args.device, scratch / "equality"))
            rows = [
                [
                    label,
                    *(
                        f"{row.get(k, float('nan')):.3g}"
                        for k in (
                            "device_merge_vs_cpu",
                            "auto_vs_device_merge",
                            "compiled_vs_device_merge",
                            "compiled_vs_cpu",
                        )
                    ),
                ]
                for label, row in report["equality"]["methods"].items()
            ]
            print_table(
                "max |diff| (nan: not applicable)",
                [
                    "method",
                    "device_merge_vs_cpu",
                    "auto_vs_device_merge",
                    "compiled_vs_device_merge",
                    "compiled_vs_cpu",
                ],
                rows,
            )
        work = args.work or (WORK if args.device == "cpu" else scratch)
        started = time.perf_counter()
        paths = make_models(work / f"gpu-check-{'tiny' if args.tiny else 'big'}", shape, args.device)
        report["build_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        materializer = Materializer(list(paths.values()), device=args.device)
        report["load_seconds"] = time.perf_counter() - started
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        if "materialize" in sections:
            save("materialize", check_materialize(materializer, paths, clock, args.timed, deadline))
            print_table(
                f"materialize on {args.device} (seconds)",
                ["method", "mode", "median", "floor", "ratio_vs_floor", "bytes/elem", "precompute"],
                [
                    [
                        m,
                        r.get("mode", "-"),
                        r.get("materialize_seconds", "-"),
                        r.get("floor_seconds", "-"),
                        r.get("ratio_vs_floor", "-"),
                        r.get("bytes_per_element", "-"),
                        r.get("precompute_seconds", "-"),
                    ]
                    for m, r in report["materialize"]["methods"].items()
                ],
            )
        if "search" in sections:
            if time.perf_counter() > deadline:
                save("search", {"skipped": "deadline"})
            else:
                save("search", check_search(materializer, paths, clock, args, shape["num_hidden_layers"]))
                s = report["search"]
                print(f"search: {s['evals_per_hour']:.0f} evals/hour; split {s['split_fraction']}")
        if "memory" in sections:
            candidate_bytes = materializer.resident(str(paths["base"])).nbytes
            save("memory", check_memory(materializer, args.device, candidate_bytes))
            print(f"memory: {report['memory']}")
        if "minimal" in sections:
            del materializer
            save("minimal", check_minimal(paths, args, clock, deadline))
            print(f"minimal cache mode: {report['minimal']}")
    save("complete", True)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
