"""Composition benchmark (issue #17): on the composition zoo, does a merge solve a task no source solves?

The zoo (docs/zoo.md "The composition zoo"): a language expert (L2, no arithmetic) and a math
expert (two-step arithmetic in L1) from one base; the target `comp_math_l2` is the arithmetic
posed and answered in L2. Fitness = exact match on the space's fixed 100-item subset of the target's
train split; every final choice is scored once on the whole test split (500 items), which no search saw.

Systems, each at the same total number of evaluations per seed (`--budget`):

  best_source       the best of base / lang / math on the target (no search; the same every seed)
  hand_ta_1.0       task arithmetic, weight 1.0 per expert (no search)
  hand_ta_0.5       task arithmetic, weight 0.5 per expert (no search)
  hand_ties         TIES, weight 1.0 and density 0.5 per expert (no search)
  random            search_spaces/composition_ps.yaml with `optimizer: random`
  ps                search_spaces/composition_ps.yaml (CMA-ES)
  dfs               search_spaces/composition_dfs.yaml (CMA-ES over the layer path and W)
  ps_dfs            search_spaces/composition_ps_dfs.yaml, half the budget per stage
  mergekit_pipeline mergekit-evolve's serial strategy on composition_ps.yaml's problem (the same
                    models, TIES genome per layer, fitness items), rebuilt from mergekit's library
                    calls as in benchmarks/search_vs_mergekit_evolve.py

Also recorded (`dfs_diagnostics`): the target score of DFS paths that swap the language expert's
first k inner layers for the math expert's (k = 0..6), and how far each math layer moved from the base.

Per system: test mean, std and a 95% CI over seeds (Student t), per-seed values, and paired
differences for the issue's targets (PS - best source >= 0.20, PS+DFS - PS >= 0, DFS - best source > 0,
PS - mergekit pipeline >= 0.05).

    PYTHONPATH=. python benchmarks/composition.py [--seeds 0 1 2 3 4] [--budget 120]

Writes benchmarks/results/composition.json and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_util import RESULTS, WORK, machine, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPACES = ROOT / "search_spaces"
ZOO = ROOT / "zoo" / "composition"
TARGET = "comp_math_l2"
SEARCHES = ("random", "ps", "dfs", "ps_dfs", "mergekit_pipeline")
SPACE_OF = {
    "random": "composition_ps.yaml",
    "ps": "composition_ps.yaml",
    "dfs": "composition_dfs.yaml",
    "ps_dfs": "composition_ps_dfs.yaml",
    "mergekit_pipeline": "composition_ps.yaml",
}
# two-sided 97.5 % Student t quantiles by degrees of freedom (for the 95 % CI of a mean over seeds)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def search_config(system: str, seed: int, budget: int) -> Any:
    """The space `evomerge search SPACE --seed S --max-evals N [--optimizer random]` would run."""
    from evomerge.search.space import load_space_config, parse_space

    config = load_space_config(SPACES / SPACE_OF[system])
    per_stage = budget // 2 if system == "ps_dfs" else budget
    update: dict[str, Any] = {"seed": seed, "budget": config.budget.model_copy(update={"max_evals": per_stage})}
    if system == "random":
        update["optimizer"] = parse_space(
            {**config.model_dump(mode="json"), "optimizer": "random"}, source="--optimizer"
        ).optimizer
    return config.model_copy(update=update)


def run_search(system: str, seed: int, budget: int, work: Path) -> dict[str, Any]:
    from evomerge.search.entry import local_or_ray_executor, new_search
    from evomerge.search.run import RunDir

    run_dir = work / f"{system}-seed{seed}"
    if system == "mergekit_pipeline":
        return pipeline_record(seed, budget, run_dir)
    started = time.perf_counter()
    summary = new_search(search_config(system, seed, budget), SPACES, RunDir(run_dir), local_or_ray_executor(1, None))
    final = summary.get("final") or {}
    record = {
        "system": system,
        "seed": seed,
        "test_score": final.get("test", {}).get("score"),
        "validation_score": (final.get("validation") or {}).get("score"),
        "search_score": final.get("train", {}).get("score"),
        "evaluations": summary.get("evaluations", 0),
        "seconds": round(time.perf_counter() - started, 1),
        "final_recipe": str((run_dir / "final.yaml").relative_to(ROOT)),
    }
    stage = run_dir / "ps" / "summary.json"
    if stage.exists():  # PS+DFS: what the PS stage alone reached, to see what DFS added
        ps_summary = json.loads(stage.read_text())
        record["ps_stage_test_score"] = (ps_summary.get("final") or {}).get("test", {}).get("score")
        record["ps_stage_evaluations"] = ps_summary.get("evaluations")
        record["dfs_stage_kept_ps_model"] = _kept_anchor(run_dir / "final.yaml")
    if system == "dfs":
        record["kept_anchor"] = _kept_anchor(run_dir / "final.yaml")
    return record


def pipeline_record(seed: int, budget: int, run_dir: Path) -> dict[str, Any]:
    """The mergekit-evolve pipeline on the PS space's problem; its test score is lm-eval's on the
    whole test split of the pipeline's bfloat16 merge (as mergekit-evolve would ship it)."""
    import os

    from search_vs_mergekit_evolve import run_pipeline

    cwd = os.getcwd()
    started = time.perf_counter()
    try:
        result = run_pipeline(seed, budget, run_dir, SPACES / SPACE_OF["mergekit_pipeline"])
    finally:
        os.chdir(cwd)  # the pipeline runs in its run directory
    return {
        "system": "mergekit_pipeline",
        "seed": seed,
        "status": result["status"],
        "test_score": result["test_score"],
        "test_score_float32": result.get("test_score_float32"),
        "search_score": result.get("search_score"),
        "evaluations": result.get("evaluations"),
        "seconds": round(time.perf_counter() - started, 1),
        "final_recipe": result.get("final_recipe"),
    }


def _kept_anchor(final: Path) -> bool:
    """True when the final DFS recipe is the anchor alone (its own layers in order, no re-routing)."""
    import yaml

    data = yaml.safe_load(final.read_text())
    slices = data.get("slices") or []
    return len(slices) == 1 or (len({s["sources"][0]["model"] for s in slices}) == 1 and not _has_scale(slices))


def _has_scale(slices: list[dict]) -> bool:
    return any((s["sources"][0].get("parameters") or {}).get("scale") for s in slices)


def fixed_recipes() -> dict[str, dict[str, Any]]:
    """The no-search systems as recipes: each source and the hand-written merges."""
    base, lang, math_ = (str(ZOO / n) for n in ("base", "lang", "math"))
    recipes: dict[str, dict[str, Any]] = {
        f"source_{n}": {"merge_method": "passthrough", "models": [{"model": str(ZOO / n)}]}
        for n in ("base", "lang", "math")
    }
    for weight in (1.0, 0.5):
        recipes[f"hand_ta_{weight}"] = {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [{"model": m, "parameters": {"weight": weight}} for m in (lang, math_)],
        }
    recipes["hand_ties"] = {
        "merge_method": "ties",
        "base_model": base,
        "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in (lang, math_)],
        "parameters": {"normalize": False},
    }
    return recipes


def score_fixed() -> dict[str, float]:
    """Each fixed recipe on the whole test split of the target."""
    from evomerge.workers.candidate import Candidate
    from evomerge.workers.fitness import FitnessWorker

    tasks = [{"name": TARGET, "metric": "exact_match", "weight": 1.0}]
    worker = FitnessWorker(sources=[str(ZOO / n) for n in ("base", "lang", "math")], tasks=tasks, split="test")
    out = {}
    for name, recipe in fixed_recipes().items():
        payload = {"recipe": recipe, "seed": None, "tasks": tasks, "split": "test", "subset_seed": 0}
        result = worker.evaluate(Candidate(name, payload))
        out[name] = result.fitness if result.ok else None
    return out


def dfs_diagnostics() -> dict[str, Any]:
    """Why DFS alone finds (or misses) the composition: target scores (validation split) of the paths
    lang 0, math 1..k, lang k+1..7, i.e. the anchor with its first k inner layers swapped for the
    math expert's, k = 0..6 (k = 6 is the union path). A search that flips slots one at a time has a
    slope to climb only if these rise with k; and how far each math layer moved from the base."""
    import torch
    from safetensors.torch import load_file

    from evomerge.search.space.dfs import Step, path_to_recipe
    from evomerge.workers.candidate import Candidate
    from evomerge.workers.fitness import FitnessWorker

    lang, math_ = str(ZOO / "lang"), str(ZOO / "math")
    tasks = [{"name": TARGET, "metric": "exact_match", "weight": 1.0}]
    worker = FitnessWorker(sources=[lang, math_], tasks=tasks, split="validation")
    curve = []
    for k in range(7):
        path = [Step(0, 0), *(Step(1, i) for i in range(1, k + 1)), *(Step(0, i) for i in range(k + 1, 8))]
        recipe = path_to_recipe(path, [lang, math_], ("o_proj", "down_proj")).model_dump(mode="json", exclude_none=True)
        payload = {"recipe": recipe, "seed": None, "tasks": tasks, "split": "validation", "subset_seed": 0}
        result = worker.evaluate(Candidate(f"k{k}", payload))
        curve.append({"math_inner_layers": k, "validation_score": result.fitness if result.ok else None})
    base = load_file(str(ZOO / "base" / "model.safetensors"))
    tuned = load_file(str(ZOO / "math" / "model.safetensors"))
    moved = {}
    for layer in range(8):
        keys = [k for k in base if k.startswith(f"model.layers.{layer}.")]
        delta = torch.sqrt(sum(((tuned[k] - base[k]) ** 2).sum() for k in keys))
        norm = torch.sqrt(sum((base[k] ** 2).sum() for k in keys))
        moved[layer] = round(float(delta / norm), 4)
    return {"swap_curve": curve, "math_layer_relative_delta": moved}


def ci95(values: Sequence[float]) -> tuple[float, float] | None:
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half = T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return (mean - half, mean + half)


def summarize(values: Sequence[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "ci95": ci95(values),
        "n": len(values),
        "per_seed": list(values),
    }


def paired(a: Sequence[float], b: Sequence[float], margin: float, strict: bool = False) -> dict[str, Any]:
    """a - b per seed (a paired comparison: same seed, same item subset): the mean difference
    against `margin` (>=, or > when `strict`), and whether its 95 % CI clears the margin too."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(diffs)
    interval = ci95(diffs)
    return {
        "mean": mean,
        "ci95": interval,
        "per_seed": diffs,
        "margin": margin,
        "met": mean > margin if strict else mean >= margin,
        "ci_clears_margin": interval is not None and (interval[0] > margin if strict else interval[0] >= margin),
    }


def benchmark(seeds: Sequence[int], budget: int, systems: Sequence[str], work: Path) -> dict[str, Any]:
    import torch

    from evomerge.zoo.models import verify_zoo

    torch.set_num_threads(1)
    manifest = verify_zoo(ZOO)
    started = time.perf_counter()
    fixed = score_fixed()
    sources = {k.removeprefix("source_"): v for k, v in fixed.items() if k.startswith("source_")}
    best_source = max(sources, key=lambda k: sources[k])
    diagnostics = dfs_diagnostics()
    print(json.dumps(diagnostics), flush=True)
    runs = []
    for seed in seeds:
        for system in systems:
            record = run_search(system, seed, budget, work)
            print(json.dumps(record), flush=True)
            runs.append(record)
    table: dict[str, dict[str, Any]] = {
        "best_source": {**summarize([sources[best_source]] * len(seeds)), "model": best_source, "search": False}
    }
    for name in ("hand_ta_1.0", "hand_ta_0.5", "hand_ties"):
        table[name] = {**summarize([fixed[name]] * len(seeds)), "search": False}
    for system in systems:
        values = [r["test_score"] for r in runs if r["system"] == system]
        table[system] = {**summarize(values), "search": True}
    best = [sources[best_source]] * len(seeds)
    score = {s: [r["test_score"] for r in runs if r["system"] == s] for s in systems}
    targets = {}
    if "ps" in score:
        targets["ps_minus_best_source_ge_0.20"] = paired(score["ps"], best, 0.20)
    if "ps" in score and "ps_dfs" in score:
        targets["ps_dfs_minus_ps_ge_0"] = paired(score["ps_dfs"], score["ps"], 0.0)
    if "dfs" in score:
        targets["dfs_minus_best_source_gt_0"] = paired(score["dfs"], best, 0.0, strict=True)
    if "ps" in score and "mergekit_pipeline" in score and None not in score["mergekit_pipeline"]:
        targets["ps_minus_mergekit_pipeline_ge_0.05"] = paired(score["ps"], score["mergekit_pipeline"], 0.05)
    return {
        "benchmark": "composition",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": " ".join(["python", "benchmarks/composition.py", *sys.argv[1:]]),
        "budget": {"evaluations_per_run": budget, "seeds": list(seeds), "note": "ps_dfs: half per stage"},
        "zoo": {"path": str(ZOO.relative_to(ROOT)), "seed": manifest["seed"], "models": manifest["models"]},
        "source_test_scores": sources,
        "fixed_test_scores": fixed,
        "systems": table,
        "targets": targets,
        "dfs_diagnostics": diagnostics,
        "runs": runs,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def print_results(result: dict[str, Any]) -> None:
    rows = []
    for name, s in result["systems"].items():
        interval = s["ci95"]
        rows.append(
            [
                name,
                f"{s['mean']:.3f}",
                f"{s['std']:.3f}",
                f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "-",
                " ".join(f"{v:.3f}" for v in s["per_seed"]) if s["search"] else "(fixed)",
            ]
        )
    print_table(
        f"composition zoo, target {TARGET} test exact match, {result['budget']['evaluations_per_run']} evals/run",
        ["system", "mean", "std", "95% CI", "per seed"],
        rows,
    )
    for name, t in result["targets"].items():
        ci = t["ci95"]
        ci_text = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "-"
        print(
            f"{name}: mean diff {t['mean']:+.3f}, 95% CI {ci_text}, met {t['met']}, CI clears {t['ci_clears_margin']}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budget", type=int, default=120)
    parser.add_argument("--systems", nargs="+", default=list(SEARCHES), choices=SEARCHES)
    parser.add_argument("--out", type=Path, default=RESULTS / "composition.json")
    args = parser.parse_args(argv)
    work = WORK / f"composition-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}"
    work.mkdir(parents=True, exist_ok=True)
    result = benchmark(args.seeds, args.budget, args.systems, work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_results(result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
