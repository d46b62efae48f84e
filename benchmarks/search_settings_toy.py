"""CMA-ES settings on the toy zoo: the demo's PS search under named overrides, several seeds each.

Each setting is `search_spaces/toy_ps.yaml` with some fields replaced (a JSON object merged into the
space, e.g. '{"budget": {"sigma0": 0.1667, "popsize": null}}'); a run searches `budget // popsize`
whole generations, so pick a budget that every setting's population divides (120: 8, 12, 15).
Reports per setting the final recipe's score on the search subset, the whole
validation split and the whole test split (mean ± std over seeds), and each setting's per-seed test
delta against the first setting. This is the study behind toy_ps.yaml's `popsize` and `sigma0`
(docs/search.md, "CMA-ES settings of the toy spaces").

    .venv/bin/python benchmarks/search_settings_toy.py [--seeds 0 1 2 3 4] [--budget 120] \\
        [--setting NAME JSON ...]

Default settings: `paper` (sigma0 0.1667, pycma's population: the old demo) and `toy_ps` (the space
as it is).
Writes benchmarks/results/search_settings_toy-<UTC>.json; runs go to benchmarks/work/search_settings_toy/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import WORK, print_table, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "toy_ps.yaml"
DEFAULT_SETTINGS = {"paper": {"budget": {"sigma0": 0.1667, "popsize": None}}, "toy_ps": {}}  # 0.1667: the old demo


def merged(data: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`data` with `override` merged in (nested objects merged key by key, anything else replaced)."""
    out = dict(data)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


def run_setting(override: Mapping[str, Any], seed: int, budget: int, run_dir: Path) -> dict[str, Any]:
    """One PS search with one local worker; the final recipe's search, validation and test scores."""
    from evomerge.search.driver import Search
    from evomerge.search.entry import local_or_ray_executor, start_run
    from evomerge.search.run import RunDir
    from evomerge.search.space import SearchSpace, load_space_config, parse_space
    from evomerge.zoo.models import verify_zoo

    base = load_space_config(SPACE).model_dump(mode="json")
    data = merged(base, {**override, "seed": seed})
    data["budget"] = {**data["budget"], "max_evals": budget}
    config = parse_space(data, source=f"setting {json.dumps(override)}")
    verify_zoo(SPACE.parent / config.zoo.path, seed=config.zoo.seed, mini=config.zoo.mini)
    shutil.rmtree(run_dir, ignore_errors=True)
    space = SearchSpace(config, root=SPACE.parent)
    run = RunDir(run_dir)
    start_run(space, run)
    started = time.perf_counter()
    summary = Search(run, space, local_or_ray_executor(1, None)).run_all()
    final = summary["final"] or {}
    splits = config.splits
    score = {split: final.get(split, {}).get("score") for split in (splits.search, splits.select, splits.report)}
    return {
        "seed": seed,
        "evaluations": summary["evaluations"],
        "popsize": space.popsize,
        "search": score[splits.search],
        "validation": score[splits.select],
        "test": score[splits.report],
        "seconds": time.perf_counter() - started,
    }


def summarize(runs: Sequence[dict[str, Any]], reference: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def mean_std(key: str) -> tuple[float, float]:
        values = [r[key] for r in runs]
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    deltas = [r["test"] - ref["test"] for r, ref in zip(runs, reference, strict=True)]
    test, test_std = mean_std("test")
    return {
        "test_mean": test,
        "test_std": test_std,
        "validation_mean": mean_std("validation")[0],
        "search_mean": mean_std("search")[0],
        "test_delta_per_seed": deltas,
        "test_delta_mean": statistics.fmean(deltas),
        "better_seeds": sum(d > 0 for d in deltas),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budget", type=int, default=120, help="search evaluations per run")
    parser.add_argument(
        "--setting",
        nargs=2,
        action="append",
        metavar=("NAME", "JSON"),
        help="a named override of toy_ps.yaml (repeatable; default: paper and toy_ps)",
    )
    args = parser.parse_args(argv)
    settings = {name: json.loads(text) for name, text in args.setting} if args.setting else DEFAULT_SETTINGS
    import torch

    torch.set_num_threads(1)  # the search benchmark's workers run one thread each too
    work = WORK / "search_settings_toy"
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in settings}
    for seed in args.seeds:
        for name, override in settings.items():
            record = run_setting(override, seed, args.budget, work / f"{name}-seed{seed}")
            runs[name].append(record)
            print(f"{name} seed {seed}: test {record['test']:.3f} validation {record['validation']:.3f}", flush=True)
    reference = runs[next(iter(settings))]
    summary = {name: summarize(rs, reference) for name, rs in runs.items()}
    rows = [
        [
            name,
            f"{s['test_mean']:.3f} ± {s['test_std']:.3f}",
            f"{s['validation_mean']:.3f}",
            f"{s['search_mean']:.3f}",
            f"{s['test_delta_mean']:+.3f}",
            f"{s['better_seeds']}/{len(args.seeds)}",
        ]
        for name, s in summary.items()
    ]
    print_table(
        f"toy_ps.yaml settings, {args.budget} evaluations, seeds {args.seeds} (final recipe's scores)",
        ["setting", "test mean ± std", "validation", "search subset", "test delta", "better seeds"],
        rows,
    )
    path = write_result(
        "search_settings_toy",
        {
            "command": "benchmarks/search_settings_toy.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "space": "search_spaces/toy_ps.yaml",
            "budget": args.budget,
            "seeds": args.seeds,
            "settings": settings,
            "summary": summary,
            "runs": runs,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
