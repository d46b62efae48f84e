"""The zoo's two-task merge (add + rev experts): fisher and regmean against linear and task arithmetic
at the same weights, all through `evomerge merge` recipes; greedy exact match on the test splits.

Each expert's statistics come from its own task's train split (`calibration.per_model`).

    .venv/bin/python benchmarks/data_aware_two_task.py [--zoo DIR] [--mini]   (default: the shipped zoo/toy or zoo/mini)

Writes benchmarks/results/data_aware_two_task-<UTC time>.json (bench_util: date, machine, load average).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_util import print_table, write_result  # benchmarks/ is sys.path[0] when this script runs


def recipes(zoo: Path, examples: int) -> dict[str, str]:
    add, rev, base = zoo / "add", zoo / "rev", zoo / "base"
    calibration = (
        f"calibration:\n  task: toy_add\n  split: train\n  examples: {examples}\n  seq_len: 16\n"
        f"  per_model:\n    {rev}: {{task: toy_rev, split: train}}\n"
    )
    two = (
        f"models:\n  - model: {add}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {rev}\n    parameters: {{weight: 0.5}}\n"
    )
    return {
        "linear (0.5, 0.5)": f"merge_method: linear\n{two}",
        "task_arithmetic (0.5, 0.5)": f"merge_method: task_arithmetic\nbase_model: {base}\n{two}",
        "task_arithmetic (0.8, 0.8) [zoo hand merge]": (
            f"merge_method: task_arithmetic\nbase_model: {base}\n{two.replace('0.5', '0.8')}"
        ),
        "fisher (0.5, 0.5), empirical": f"merge_method: fisher\n{two}{calibration}",
        "fisher (0.5, 0.5), sampled": f"merge_method: fisher\n{two}{calibration}  fisher: sampled\n",
        "regmean (0.5, 0.5), alpha 0.9": f"merge_method: regmean\n{two}parameters: {{alpha: 0.9}}\n{calibration}",
        "regmean (0.5, 0.5), alpha 1.0": f"merge_method: regmean\n{two}parameters: {{alpha: 1.0}}\n{calibration}",
        "regmean (0.5, 0.5), alpha 0.5": f"merge_method: regmean\n{two}parameters: {{alpha: 0.5}}\n{calibration}",
    }


def accuracy(model_dir: Path) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    from evomerge.zoo.models import exact_match

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    scores = {task: round(exact_match(model, task, "test"), 4) for task in ("toy_add", "toy_rev")}
    scores["mean"] = round((scores["toy_add"] + scores["toy_rev"]) / 2, 4)
    return scores


def run(zoo: Path, mini: bool, examples: int) -> dict:
    from evomerge.merge.runner import merge_from_file
    from evomerge.zoo.models import verify_zoo

    torch.set_num_threads(1)
    verify_zoo(zoo, mini=mini)
    rows: dict[str, dict] = {name: accuracy(zoo / name) for name in ("add", "rev")}
    with tempfile.TemporaryDirectory(prefix="evomerge-two-task-") as tmp:
        for name, text in recipes(zoo, examples).items():
            recipe = Path(tmp) / "recipe.yaml"
            recipe.write_text(text, encoding="utf-8")
            out = Path(tmp) / f"out{len(rows)}"
            started = time.perf_counter()
            merge_from_file(recipe, out, progress=False)
            seconds = round(time.perf_counter() - started, 1)
            rows[name] = {**accuracy(out), "merge_seconds": seconds}
    return {
        "zoo": "mini" if mini else "full",
        "calibration_examples_per_model": examples,
        "metric": "greedy exact match on the full test splits",
        "results": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=None, help="a zoo directory (default: the shipped one)")
    parser.add_argument("--mini", action="store_true")
    parser.add_argument("--examples", type=int, default=256)
    args = parser.parse_args()
    from evomerge.io.paths import shipped_zoo

    result = run(args.zoo or shipped_zoo(args.mini), args.mini, args.examples)
    print_table(
        f"two-task merge ({result['zoo']} zoo), {result['metric']}",
        ["merge", "toy_add", "toy_rev", "mean"],
        [[name, row["toy_add"], row["toy_rev"], row["mean"]] for name, row in result["results"].items()],
    )
    print(f"wrote {write_result('data_aware_two_task', result)}")


if __name__ == "__main__":
    main()
