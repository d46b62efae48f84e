"""Search benchmark against the peer: evomerge vs the mergekit-evolve pipeline on the toy zoo.

Systems, each searching the same problem (the `add` and `rev` experts over `base`, the merge method
of toy_ps.yaml (TIES) with a weight and a density per model per layer, fitness = mean exact match
of toy_add and toy_rev on the same seeded 100-item subset of each train split) for the same number
of evaluations, with several seeds:

  evomerge_ps         search_spaces/toy_ps.yaml, CMA-ES (the README demo; its sigma0 and population
                      are the space's own, see docs/search.md "CMA-ES settings of the toy spaces")
  evomerge_ps_dfs     search_spaces/toy_ps_dfs.yaml, half the budget per stage
  evomerge_random     toy_ps.yaml with `--optimizer random`
  evomerge_ps_top1    toy_ps.yaml with `select_top_k: 1`: the best search score is the choice, as in
                      the pipeline (no re-scoring of a top-k on the validation split)
  mergekit_pipeline   mergekit-evolve's `serial` strategy rebuilt from mergekit's library calls
                      (benchmarks/mergekit_pipeline.py): ModelGenome, run_merge to a temporary
                      directory, lm-eval simple_evaluate on it, cma.fmin2 with its defaults

Each final choice is scored once on the whole test split (500 items per task), which no search saw.
mergekit-evolve itself is only run where a GPU exists (it cannot run CPU-only:
../shared/reference/mergekit_evolve_cpu.md); otherwise the results say so and why.

Every (system, seed) runs in its own process, systems alternating within each seed so that all
see the same machine load. Search time is measured from the start of the search (worker start-up
included) to the end of its last search evaluation; evomerge's selection and report phases and
the pipeline's final test evaluation are not in it.

    .venv/bin/python benchmarks/search_vs_mergekit_evolve.py [--seeds 0 1 2] [--budget 120]

Writes benchmarks/results/search_vs_mergekit_evolve.json and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_util import RESULTS, WORK, machine, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PS_SPACE = ROOT / "search_spaces" / "toy_ps.yaml"
PS_DFS_SPACE = ROOT / "search_spaces" / "toy_ps_dfs.yaml"
SYSTEMS = ("evomerge_ps", "mergekit_pipeline", "evomerge_ps_dfs", "evomerge_random", "evomerge_ps_top1")
EVOMERGE_SYSTEMS = ("evomerge_ps", "evomerge_ps_dfs", "evomerge_random", "evomerge_ps_top1")
RESULT_FILE = RESULTS / "search_vs_mergekit_evolve.json"
RUN_TIMEOUT_S = 1800
CPU_BLOCKERS = [
    "import fails against lm-eval >= 0.4.10 (mergekit/evo/actors.py annotates "
    "lm_eval.models.vllm_causallms.VLLM; monkeypatch.py imports vllm unguarded)",
    "every Ray actor/task and the serial placement group request num_gpus=1: waits forever on a CPU node",
    "pool --in-memory: ReturnTensor typing error in mergekit/plan.py on the first candidate",
    "pool on-disk: torch.cpu.empty_cache() does not exist (actors.py:97)",
    "serial/buffered: lm-eval HFLM gets no device and defaults to cuda (helpers.py:64-75); "
    "serial exits, buffered hangs",
]


# -- one (system, seed) run, in its own process --------------------------------------------------


class SearchClock:
    """Wall time of search phases: from a stage's start to its last search evaluation."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0
        self._last = 0.0

    def start_stage(self) -> None:
        self._started = self._last = time.perf_counter()

    def end_stage(self) -> None:
        self.seconds += self._last - self._started

    def __call__(self, progress: Any, record: dict[str, Any] | None) -> None:
        if record is not None and record["phase"] == "search":
            self._last = time.perf_counter()

    # the search's display: opened once per stage (a PS+DFS run has two)
    def __enter__(self) -> SearchClock:
        return self

    def start(self, progress: Any) -> None:
        self.start_stage()

    def __exit__(self, *exc: Any) -> None:
        self.end_stage()


def evomerge_config(system: str, seed: int, budget: int) -> tuple[Any, Path]:
    """The space a `evomerge search SPACE --seed S --max-evals N [--optimizer random]` would run."""
    from evomerge.search.space import load_space_config, parse_space

    space_path = PS_DFS_SPACE if system == "evomerge_ps_dfs" else PS_SPACE
    config = load_space_config(space_path)
    per_stage = budget // 2 if system == "evomerge_ps_dfs" else budget
    update: dict[str, Any] = {"seed": seed, "budget": config.budget.model_copy(update={"max_evals": per_stage})}
    if system == "evomerge_ps_top1":  # no validation re-scoring: the best search score is chosen, like the pipeline
        update["budget"] = update["budget"].model_copy(update={"select_top_k": 1})
    if system == "evomerge_random":
        update["optimizer"] = parse_space(
            {**config.model_dump(mode="json"), "optimizer": "random"}, source="--optimizer"
        ).optimizer
    return config.model_copy(update=update), space_path.parent


def run_evomerge(system: str, seed: int, budget: int, run_dir: Path) -> dict[str, Any]:
    """evomerge's own driver with one local worker (the CLI default), timing the search phases."""
    from evomerge.search.entry import local_or_ray_executor, new_search
    from evomerge.search.run import RunDir
    from evomerge.zoo.models import verify_zoo

    config, root = evomerge_config(system, seed, budget)
    verify_zoo(root / config.zoo.path, seed=config.zoo.seed, mini=config.zoo.mini)
    clock = SearchClock()
    summary = new_search(config, root, RunDir(run_dir), local_or_ray_executor(1, None), display=lambda name: clock)
    return evomerge_record(summary, clock.seconds, run_dir)


def evomerge_record(summary: dict[str, Any], search_seconds: float, run_dir: Path) -> dict[str, Any]:
    final = summary.get("final") or {}
    test = final.get("test", {})
    return {
        "status": "ok" if test.get("score") is not None else "failed",
        "reason": summary.get("reason") or test.get("reason"),
        "test_score": test.get("score"),
        "test_ci95": test.get("ci95"),
        "search_score": final.get("train", {}).get("score"),
        "select_score": (final.get("validation") or {}).get("score"),
        "evaluations": summary.get("evaluations", 0),
        "failed_evaluations": summary.get("failed", 0),
        "search_seconds": search_seconds,
        "run_dir": str(run_dir),
        "final_recipe": str(run_dir / "final.yaml") if final else None,
        **ps_stage_scores(run_dir),
    }


def ps_stage_scores(run_dir: Path) -> dict[str, Any]:
    """PS+DFS: the PS stage's own final test score, to see what the DFS stage added (or lost)."""
    stage = run_dir / "ps" / "summary.json"
    if not stage.exists():
        return {}
    final = json.loads(stage.read_text()).get("final") or {}
    return {"ps_stage_test_score": final.get("test", {}).get("score")}


def pipeline_problem(seed: int, space: Path = PS_SPACE) -> dict[str, Any]:
    """A PS space's problem as the pipeline sees it: models, base, tasks, and evomerge's item subset."""
    from evomerge.scoring.lm_tasks import seeded_subset, task_seed
    from evomerge.search.payload import derive_seed
    from evomerge.search.space import load_space_config

    config = load_space_config(space)
    root = space.parent

    def absolute(ref: str) -> str:
        return str((root / ref).resolve())

    subset_seed = derive_seed(seed, "data", config.splits.search)
    samples = {
        t.name: seeded_subset(train_size(t.name), t.limit, task_seed(subset_seed, t.name))
        for t in config.tasks
        if t.limit is not None
    }
    return {
        "models": [absolute(m) for m in config.models],
        "base_model": absolute(config.base_model),
        "tasks": [(t.name, t.weight) for t in config.tasks],
        "samples": samples,
        "method": config.ps.method,
        "search_split": config.splits.search,
        "report_split": config.splits.report,
        "zoo": (root / config.zoo.path, config.zoo.seed),
    }


def train_size(task: str) -> int:
    from evomerge.io.paths import tasks_dir

    with open(tasks_dir() / "data" / f"{task}_train.jsonl") as handle:
        return sum(1 for line in handle if line.strip())


def run_pipeline(seed: int, budget: int, run_dir: Path, space: Path = PS_SPACE) -> dict[str, Any]:
    """mergekit-evolve's serial strategy for one seed on a PS space's problem (the toy zoo's by
    default); a raised evaluation fails the run, as there."""
    import torch
    from mergekit_pipeline import FitnessTask, SerialPipeline, cma_search, make_genome, split_task_folder

    from evomerge.io.paths import tasks_dir
    from evomerge.zoo.models import verify_zoo

    torch.set_num_threads(1)  # a Ray task with num_cpus=1 runs with OMP_NUM_THREADS=1
    problem = pipeline_problem(seed, space)
    verify_zoo(*problem["zoo"])
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(run_dir)  # pycma writes outcmaes/ and lm-eval looks for git here
    yamls = [tasks_dir() / f"{name}.yaml" for name, _ in problem["tasks"]]
    tasks = [FitnessTask(name, "exact_match,none", weight) for name, weight in problem["tasks"]]
    # the same merge operator as evomerge's space, so both searches face the same problem
    genome = make_genome(
        problem["models"], problem["base_model"], layer_granularity=1, normalize=False, merge_method=problem["method"]
    )
    search_folder = split_task_folder(yamls, problem["search_split"], run_dir / "tasks_search")
    pipeline = SerialPipeline(genome, tasks, search_folder, run_dir / "merged", seed=seed)
    popsize = 4 + int(3 * math.log(genome.initial_genotype().numel()))  # pycma's default
    # fmin2 runs floor(maxfevals / popsize) + 1 generations, then evaluates the final mean once
    max_fevals = max(popsize * (budget // popsize - 1), 1)
    started = time.perf_counter()
    try:
        log, es = cma_search(pipeline, max_fevals, seed, problem["samples"])
    except Exception as exc:  # mergekit-evolve ends the whole search on any failed evaluation
        return {
            "status": "failed",
            "reason": f"{type(exc).__name__}: {exc}"[:500],
            "test_score": None,
            "evaluations": None,
            "failed_evaluations": 1,
            "search_seconds": time.perf_counter() - started,
        }
    search_seconds = time.perf_counter() - started
    report_folder = split_task_folder(yamls, problem["report_split"], run_dir / "tasks_report")
    assert log.best_genotype is not None
    best_config = genome.genotype_merge_config(log.best_genotype)
    (run_dir / "best_config.yaml").write_text(best_config.to_yaml())
    test = SerialPipeline(genome, tasks, report_folder, run_dir / "merged", seed=seed).evaluate(log.best_genotype)
    test32 = SerialPipeline(genome, tasks, report_folder, run_dir / "merged", seed=seed, dtype="float32").evaluate(
        log.best_genotype
    )
    return {
        "status": "ok",
        "reason": None,
        "test_score": test["score"],
        "test_metrics": test["metrics"],
        "test_score_float32": test32["score"],
        "search_score": log.best_score,
        "evaluations": len(log.scores),
        "failed_evaluations": 0,
        "search_seconds": search_seconds,
        "max_fevals": max_fevals,
        "popsize": es.popsize,
        "generations": es.countiter,
        "run_dir": str(run_dir),
        "final_recipe": str(run_dir / "best_config.yaml"),
    }


def run_one(system: str, seed: int, budget: int, run_dir: Path) -> dict[str, Any]:
    from mergekit_pipeline import quiet_env

    quiet_env()
    started, load_before = time.perf_counter(), os.getloadavg()
    if system == "mergekit_pipeline":
        record = run_pipeline(seed, budget, run_dir)
    else:
        record = run_evomerge(system, seed, budget, run_dir)
    record.update(
        system=system,
        seed=seed,
        total_seconds=time.perf_counter() - started,
        load_average={"before": [round(v, 2) for v in load_before], "after": [round(v, 2) for v in os.getloadavg()]},
    )
    for key in ("run_dir", "final_recipe"):
        if record.get(key):
            record[key] = os.path.relpath(record[key], ROOT)
    if record.get("evaluations") and record["search_seconds"] > 0:
        record["evals_per_hour"] = 3600 * record["evaluations"] / record["search_seconds"]
    return record


# -- the whole benchmark ---------------------------------------------------------------------------


def child_command(system: str, seed: int, budget: int, run_dir: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one",
        system,
        "--seed",
        str(seed),
        "--budget",
        str(budget),
        "--run-dir",
        str(run_dir),
        "--out",
        str(out),
    ]


def run_child(system: str, seed: int, budget: int, work: Path) -> dict[str, Any]:
    """One run in a fresh process (its own torch threads and RNGs); a crash or timeout fails it."""
    run_dir = work / f"{system}-seed{seed}"
    out, log = work / f"{system}-seed{seed}.json", work / f"{system}-seed{seed}.log"
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    with log.open("w") as handle:
        try:
            done = subprocess.run(
                child_command(system, seed, budget, run_dir, out),
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                timeout=RUN_TIMEOUT_S,
            )
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code == 0 and out.exists():
        return json.loads(out.read_text())
    return {
        "system": system,
        "seed": seed,
        "status": "failed",
        "test_score": None,
        "reason": f"process exit {code}; see {log}",
        "evaluations": None,
        "failed_evaluations": None,
    }


def summarize(system: str, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["status"] == "ok"]
    scores = [r["test_score"] for r in ok]
    evals = sum(r["evaluations"] for r in ok)
    seconds = sum(r["search_seconds"] for r in ok)
    return {
        "runs": len(runs),
        "failed_runs": len(runs) - len(ok),
        "test_score_mean": statistics.fmean(scores) if scores else None,
        "test_score_std": statistics.stdev(scores) if len(scores) > 1 else 0.0 if scores else None,
        "test_score_best": max(scores) if scores else None,
        "evals_per_hour": 3600 * evals / seconds if seconds else None,
        "evaluations_per_run": statistics.fmean(r["evaluations"] for r in ok) if ok else None,
        "failed_evaluations": sum(r.get("failed_evaluations") or 0 for r in runs),
        "search_seconds_per_run": statistics.fmean(r["search_seconds"] for r in ok) if ok else None,
    }


def targets(systems: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's two targets: evomerge evals/hour >= 3x the pipeline's; best evomerge test score
    (the best system's mean over seeds) >= the pipeline's mean + 0.05."""
    peer = systems.get("mergekit_pipeline", {})
    ours = {k: v for k, v in systems.items() if k in EVOMERGE_SYSTEMS and v.get("test_score_mean") is not None}
    out: dict[str, Any] = {}
    if peer.get("evals_per_hour") and systems.get("evomerge_ps", {}).get("evals_per_hour"):
        ratio = systems["evomerge_ps"]["evals_per_hour"] / peer["evals_per_hour"]
        out["speed"] = {"evomerge_ps_over_pipeline": ratio, "target": 3.0, "met": ratio >= 3.0}
    if peer.get("test_score_mean") is not None and ours:
        best = max(ours, key=lambda k: ours[k]["test_score_mean"])
        margin = ours[best]["test_score_mean"] - peer["test_score_mean"]
        out["quality"] = {"best_evomerge_system": best, "margin": margin, "target": 0.05, "met": margin >= 0.05}
    return out


def per_seed_deltas(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Test score of each evomerge system minus the pipeline's on the same seed (same item subset)."""
    peer = {r["seed"]: r.get("test_score") for r in runs if r["system"] == "mergekit_pipeline"}
    deltas: dict[str, dict[str, float | None]] = {}
    for run in runs:
        if run["system"] in EVOMERGE_SYSTEMS and run["seed"] in peer:
            ours, theirs = run.get("test_score"), peer[run["seed"]]
            delta = ours - theirs if ours is not None and theirs is not None else None
            deltas.setdefault(run["system"], {})[str(run["seed"])] = delta
    return deltas


def source_scores(runs: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """The base and the two experts on the test split (evomerge's report phase), for context."""
    for run in runs:
        summary = ROOT / str(run.get("run_dir")) / "summary.json"
        if run["system"] == "evomerge_ps" and run["status"] == "ok" and summary.exists():
            sources = json.loads(summary.read_text()).get("sources", {})
            return {Path(model).name: entry["test"].get("score") for model, entry in sources.items()}
    return {}


def library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for package in ("mergekit", "cma", "lm_eval", "torch", "transformers"):
        try:
            found[package] = version(package.replace("_", "-"))
        except PackageNotFoundError:
            found[package] = None
    return found


def source_commit() -> str | None:
    """The evomerge commit measured: EVOMERGE_COMMIT (set when running from an exported tree) or git."""
    if os.environ.get("EVOMERGE_COMMIT"):
        return os.environ["EVOMERGE_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def mergekit_evolve_status() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        return {
            "run": False,
            "reason": "a GPU is present but running mergekit-evolve itself is not automated here yet",
            "cpu_blockers": CPU_BLOCKERS,
        }
    return {
        "run": False,
        "reason": "no GPU on this machine; mergekit-evolve 0.1.5 completes no evaluation "
        "CPU-only (see ../shared/reference/mergekit_evolve_cpu.md)",
        "cpu_blockers": CPU_BLOCKERS,
    }


def benchmark(seeds: Sequence[int], budget: int, systems: Sequence[str], work: Path) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    for i, seed in enumerate(seeds):
        order = list(systems[i % len(systems) :]) + list(systems[: i % len(systems)])  # rotate per seed
        for system in order:
            record = run_child(system, seed, budget, work)
            runs.append(record)
            print(
                f"seed {seed} {system}: {record['status']} test={record.get('test_score')} "
                f"evals={record.get('evaluations')} evals/h={record.get('evals_per_hour')}",
                flush=True,
            )
    per_system = {s: summarize(s, [r for r in runs if r["system"] == s]) for s in systems}
    return {
        "benchmark": "search_vs_mergekit_evolve",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "libraries": library_versions()},
        "evomerge_commit": source_commit(),
        "command": f".venv/bin/python benchmarks/search_vs_mergekit_evolve.py --seeds {' '.join(map(str, seeds))} "
        f"--budget {budget}",
        "budget": {
            "evaluations_per_run": budget,
            "seeds": list(seeds),
            "note": "evomerge_ps_dfs: half per stage; mergekit_pipeline: cma.fmin2 maxfevals chosen so that "
            "it runs the budget in whole generations of its own population (pycma's default), "
            "plus its final-mean evaluation",
        },
        "problem": {
            "space": "search_spaces/toy_ps.yaml",
            "search": "train, seeded 100-item subset per task",
            "select": "evomerge: top 5 re-scored on the whole validation split; pipeline: best search "
            "score (mergekit-evolve's best_config.yaml)",
            "report": "whole test split (500 items per task)",
        },
        "source_models_test_score": source_scores(runs),
        "systems": per_system,
        "targets": targets(per_system),
        "per_seed_delta_vs_pipeline": per_seed_deltas(runs),
        "mergekit_evolve": mergekit_evolve_status(),
        "wall_seconds": time.perf_counter() - started,
        "runs": runs,
    }


def print_results(result: dict[str, Any]) -> None:
    rows = []
    for name, s in result["systems"].items():
        mean, std = s["test_score_mean"], s["test_score_std"]
        rows.append(
            [
                name,
                f"{mean:.3f} ± {std:.3f}" if mean is not None else "-",
                f"{s['test_score_best']:.3f}" if s["test_score_best"] is not None else "-",
                s["evaluations_per_run"],
                round(s["evals_per_hour"]) if s["evals_per_hour"] else "-",
                f"{s['failed_runs']}/{s['runs']}",
                s["failed_evaluations"],
            ]
        )
    print_table(
        f"search benchmark, budget {result['budget']['evaluations_per_run']} evaluations, seeds "
        f"{result['budget']['seeds']} (test score: whole test split)",
        ["system", "test mean ± std", "best", "evals/run", "evals/hour", "failed runs", "failed evals"],
        rows,
    )
    for name, target in result["targets"].items():
        print(f"target {name}: {json.dumps(target)}")
    for name, deltas in result["per_seed_delta_vs_pipeline"].items():
        shown = ", ".join(f"seed {seed}: " + (f"{d:+.3f}" if d is not None else "-") for seed, d in deltas.items())
        print(f"{name} - mergekit_pipeline, per seed: {shown}")
    print(f"mergekit-evolve itself: not run ({result['mergekit_evolve']['reason']})")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=120, help="search evaluations per run")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--work", type=Path, default=WORK / "search_vs_mergekit_evolve")
    parser.add_argument("--out", type=Path, default=RESULT_FILE)
    parser.add_argument("--one", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # absolute paths: the pipeline's child process changes its working directory to its run folder
    args.work, args.out = args.work.resolve(), args.out.resolve()
    if args.run_dir is not None:
        args.run_dir = args.run_dir.resolve()
    if args.one:
        record = run_one(args.one, args.seed, args.budget, args.run_dir)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        return
    result = benchmark(args.seeds, args.budget, args.systems, args.work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_results(result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
