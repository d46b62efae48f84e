"""Merge speed and peak memory: `evomerge merge` vs `mergekit-yaml` on ~100M-parameter models.

Generates three Llama-shaped checkpoints (a base and two fine-tunes, bf16, ~100M parameters each)
under benchmarks/work/, then runs the same `ties` and `dare_ties` recipes through both CLIs,
alternating which goes first, several repetitions each. Each run is a fresh process (startup and
imports count, as they do for a user); its wall time and peak RSS (`wait4` rusage of that child)
are recorded. Both tools get the same number of torch threads (`--threads`, default 1). Prints a
table and writes benchmarks/results/merge_speed-<timestamp>.json.

    .venv/bin/python benchmarks/merge_speed.py [--repeats 3] [--threads 1] [--keep-models]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_util import write_result  # benchmarks/ is sys.path[0] when this script runs

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work" / "merge_speed"
BIN = Path(sys.executable).parent

SHAPE = {
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 8,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
}


def make_models(root: Path) -> dict[str, Path]:
    """Base + two fine-tunes (base + small seeded noise), written directly as safetensors."""
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    paths = {name: root / name for name in ("base", "ft1", "ft2")}
    if all((p / "model.safetensors").exists() for p in paths.values()):
        return paths
    h, inter, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    kv = h // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
    generator = torch.Generator().manual_seed(0)
    base = {
        n: (torch.ones(s) if len(s) == 1 else 0.02 * torch.randn(s, generator=generator)) for n, s in shapes.items()
    }
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        **SHAPE,
    }
    for seed, (name, path) in enumerate(paths.items()):
        path.mkdir(parents=True, exist_ok=True)
        if name == "base":
            state = base
        else:
            noise = torch.Generator().manual_seed(seed)
            state = {n: t + 0.002 * torch.randn(t.shape, generator=noise) for n, t in base.items()}
        save_file(
            {n: t.to(torch.bfloat16).contiguous() for n, t in state.items()},
            str(path / "model.safetensors"),
            metadata={"format": "pt"},
        )
        (path / "config.json").write_text(json.dumps(config, indent=2))
    return paths


def write_recipes(root: Path, models: dict[str, Path]) -> dict[str, Path]:
    recipes = {}
    for method in ("ties", "dare_ties"):
        text = f"""merge_method: {method}
base_model: {models["base"]}
models:
  - model: {models["ft1"]}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {models["ft2"]}
    parameters: {{weight: 0.4, density: 0.5}}
"""
        recipes[method] = root / f"{method}.yml"
        recipes[method].write_text(text)
    return recipes


def command(tool: str, recipe: Path, out: Path, threads: int | None) -> list[str]:
    if tool == "evomerge":
        extra = ["--threads", str(threads)] if threads else []
        return [str(BIN / "evomerge"), "merge", str(recipe), str(out), "--quiet", "--overwrite", "--seed", "0", *extra]
    extra = ["--num-threads", str(threads)] if threads else []
    return [
        str(BIN / "mergekit-yaml"),
        str(recipe),
        str(out),
        "--no-copy-tokenizer",
        "--no-write-model-card",
        "--quiet",
        "--random-seed",
        "0",
        *extra,
    ]


def timed_run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one child process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep-models", action="store_true", help="keep benchmarks/work/ afterwards")
    parser.add_argument("--make-models-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads given to both tools (0: each tool's default). One thread avoids "
        "OpenMP spin-waiting on a shared, oversubscribed machine",
    )
    args = parser.parse_args()

    have_mergekit = (BIN / "mergekit-yaml").exists()
    tools = ["evomerge", "mergekit"] if have_mergekit else ["evomerge"]
    WORK.mkdir(parents=True, exist_ok=True)
    if args.make_models_only:
        make_models(WORK / "models")
        return
    print("generating models ...", flush=True)
    # In a child process: Linux carries a process's peak RSS across fork + exec, so a parent that had
    # held the generated tensors would inflate every measured child's ru_maxrss to its own peak.
    subprocess.run([sys.executable, __file__, "--make-models-only"], check=True)
    models = make_models(WORK / "models")  # the files exist now: only their paths are returned
    from safetensors import safe_open

    with safe_open(str(models["base"] / "model.safetensors"), "pt") as fh:
        params = sum(_numel(fh.get_slice(k).get_shape()) for k in fh.keys())
    recipes = write_recipes(WORK, models)
    runs: list[dict[str, object]] = []
    for method, recipe in recipes.items():
        for rep in range(args.repeats):
            order = tools if rep % 2 == 0 else list(reversed(tools))
            for tool in order:
                out = WORK / f"out-{tool}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                wall, rss = timed_run(command(tool, recipe, out, args.threads or None))
                runs.append(
                    {
                        "method": method,
                        "tool": tool,
                        "repeat": rep,
                        "wall_s": round(wall, 3),
                        "peak_rss_mb": round(rss, 1),
                    }
                )
                print(f"  {method:9s} {tool:9s} rep {rep}: {wall:6.2f} s  {rss:7.1f} MB", flush=True)
                shutil.rmtree(out, ignore_errors=True)

    summary = {}
    for method in recipes:
        row: dict[str, float] = {}
        for tool in tools:
            mine = [r for r in runs if r["method"] == method and r["tool"] == tool]
            row[f"{tool}_wall_s"] = round(statistics.median(r["wall_s"] for r in mine), 3)
            row[f"{tool}_peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in mine), 1)
        if have_mergekit:
            row["wall_ratio"] = round(row["evomerge_wall_s"] / row["mergekit_wall_s"], 3)
            row["rss_ratio"] = round(row["evomerge_peak_rss_mb"] / row["mergekit_peak_rss_mb"], 3)
        summary[method] = row

    print()
    header = (
        f"{'method':10s} {'evomerge s':>10s} {'mergekit s':>10s} {'ratio':>6s} "
        f"{'evo RSS MB':>10s} {'mk RSS MB':>10s} {'ratio':>6s}"
    )
    print(header)
    print("-" * len(header))
    for method, row in summary.items():
        print(
            f"{method:10s} {row['evomerge_wall_s']:10.2f} {row.get('mergekit_wall_s', float('nan')):10.2f} "
            f"{row.get('wall_ratio', float('nan')):6.3f} {row['evomerge_peak_rss_mb']:10.1f} "
            f"{row.get('mergekit_peak_rss_mb', float('nan')):10.1f} {row.get('rss_ratio', float('nan')):6.3f}"
        )

    path = write_result(
        "merge_speed",
        {
            "models": {"parameters_each": params, "dtype": "bfloat16", "shape": SHAPE, "count": 3},
            "repeats": args.repeats,
            "threads": args.threads or "default",
            "load_average_at_end": os.getloadavg(),
            "statistic": "median wall time, max peak RSS over repeats",
            "summary": summary,
            "runs": runs,
            "targets": {"wall_ratio_max": 0.33, "rss_ratio_max": 1.0},
        },
        packages=("torch", "safetensors", "transformers", "mergekit"),
    )
    print(f"\nwrote {path.relative_to(ROOT.parent)}")
    if not args.keep_models:
        shutil.rmtree(WORK, ignore_errors=True)


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


if __name__ == "__main__":
    main()
