"""Loss barrier between two independently trained zoo-sized models: plain interpolation vs
Git Re-Basin + interpolation vs Git Re-Basin + REPAIR (all through `evomerge merge` recipes).

Two tiny Llamas of the zoo's size are trained on the zoo's base mixture from different
initialisations (and data orders). The barrier at the midpoint is
    L(merge at t = 0.5) - (L(A) + L(B)) / 2
with L the answer-only cross-entropy on a fixed held-out sample of the same mixture.

REPAIR's calibration data are fresh samples of the models' training mixture (their own stream
seed, not the evaluation's): REPAIR matches statistics of the distribution the models were trained
on. One extra row calibrates on the add/rev/shift task splits instead (16% of that mixture), to
show how much the choice of data matters.

    .venv/bin/python benchmarks/rebasin_barrier.py [--size full|mini] [--steps N]

Writes benchmarks/results/rebasin_barrier-<UTC time>.json (bench_util: date, machine, load average).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_util import print_table, write_result  # benchmarks/ is sys.path[0] when this script runs


def train_pair(out: Path, size: str, steps: int, seeds: tuple[int, int]) -> list[Path]:
    from evomerge.io.paths import tasks_dir
    from evomerge.zoo.models import FULL, MINI, ExampleStream, build_tokenizer, new_model, train
    from evomerge.zoo.toy_tasks import held_out_prompts

    cfg = FULL if size == "full" else MINI
    held_out = held_out_prompts(tasks_dir())
    tokenizer = build_tokenizer()
    paths = []
    for seed in seeds:
        model = new_model(cfg, seed)
        train(model, ExampleStream(cfg.base_mix, f"barrier:{seed}", held_out), steps, cfg.base_lr, cfg.batch)
        path = out / f"model_seed{seed}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


@torch.no_grad()
def eval_loss(model_dir: Path, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for ids, labels in batches:
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(loss)
        count += int((labels != -100).sum())
    return total / count


def eval_batches(size: str, n_batches: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fresh samples of the training mixture (a seed neither model was trained with)."""
    from evomerge.zoo.models import FULL, MINI, ExampleStream

    cfg = FULL if size == "full" else MINI
    stream = ExampleStream(cfg.base_mix, "barrier:eval", set())
    return [stream.batch(128) for _ in range(n_batches)]


def write_calibration(path: Path, size: str, examples: int = 512) -> Path:
    """Prompt/answer pairs drawn from the training mixture with a seed of their own, as jsonl."""
    from evomerge.io.paths import tasks_dir
    from evomerge.zoo.models import FULL, MINI, ExampleStream
    from evomerge.zoo.toy_tasks import held_out_prompts

    cfg = FULL if size == "full" else MINI
    stream = ExampleStream(cfg.base_mix, "barrier:calibration", held_out_prompts(tasks_dir()))
    rows = (stream.sample() for _ in range(examples))
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows), encoding="utf-8")
    return path


RECIPES = {
    "plain interpolation": "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
    "  - model: {b}\n    parameters: {{weight: 0.5}}\n",
    "interpolation + repair": "merge_method: repair\nbase_model: {a}\nmodels:\n  - model: {b}\n"
    "parameters: {{t: 0.5, permute: false}}\n{calibration}",
    "rebasin + interpolation": "merge_method: rebasin\nbase_model: {a}\nmodels:\n  - model: {b}\n"
    "parameters: {{t: 0.5}}\n",
    "rebasin + repair": "merge_method: repair\nbase_model: {a}\nmodels:\n  - model: {b}\nparameters: {{t: 0.5}}\n"
    "{calibration}",
    "rebasin + repair, task-split calibration": "merge_method: repair\nbase_model: {a}\nmodels:\n  - model: {b}\n"
    "parameters: {{t: 0.5}}\n{task_calibration}",
}
CALIBRATION = "calibration: {{file: {file}, examples: 512, seq_len: 16}}\n"
TASK_CALIBRATION = "calibration: {task: [toy_add, toy_rev, toy_shift], split: train, examples: 384, seq_len: 16}\n"


def run(size: str, steps: int) -> dict:
    from evomerge.merge.runner import merge_from_file

    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="evomerge-barrier-") as tmp:
        work = Path(tmp)
        a, b = train_pair(work, size, steps, (11, 22))
        train_seconds = time.perf_counter() - started
        batches = eval_batches(size)
        endpoints = {"A": eval_loss(a, batches), "B": eval_loss(b, batches)}
        mean_end = (endpoints["A"] + endpoints["B"]) / 2
        calibration = CALIBRATION.format(file=write_calibration(work / "calibration.jsonl", size))
        rows = {}
        for i, (name, template) in enumerate(RECIPES.items()):
            recipe = work / f"recipe{i}.yaml"
            recipe.write_text(
                template.format(a=a, b=b, calibration=calibration, task_calibration=TASK_CALIBRATION), encoding="utf-8"
            )
            out_dir = work / recipe.stem
            t0 = time.perf_counter()
            merge_from_file(recipe, out_dir, progress=False)
            loss = eval_loss(out_dir, batches)
            rows[name] = {
                "midpoint_loss": round(loss, 4),
                "barrier": round(loss - mean_end, 4),
                "merge_seconds": round(time.perf_counter() - t0, 1),
            }
    result = {
        "size": size,
        "train_steps": steps,
        "seeds": [11, 22],
        "endpoint_loss": {k: round(v, 4) for k, v in endpoints.items()},
        "results": rows,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "eval": "answer-only cross-entropy on 8 x 128 fresh samples of the zoo base mixture",
        "calibration": "512 samples of the zoo base mixture (stream seed barrier:calibration), seq_len 16",
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("full", "mini"), default="full")
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()
    result = run(args.size, args.steps)
    print(f"endpoint loss: A {result['endpoint_loss']['A']:.4f}, B {result['endpoint_loss']['B']:.4f}")
    print_table(
        f"loss barrier at t = 0.5 ({args.size} size, {args.steps} steps)",
        ["merge", "midpoint loss", "barrier", "merge s"],
        [[name, row["midpoint_loss"], row["barrier"], row["merge_seconds"]] for name, row in result["results"].items()],
    )
    print(f"wrote {write_result('rebasin_barrier', result)}")


if __name__ == "__main__":
    main()
