"""Composition zoo designs (issue #17): which fine-tunes of one base compose into the target?

Each variant trains a base and the two experts of the composition zoo (evomerge/zoo/composition.py)
with its own base mixture, embedding tying and trained parts, then scores on the first `--limit`
test items of each task: the three sources, task arithmetic at 0.5 and 1.0 per expert (with
disjoint trained parts, 1.0 is exactly the union of both fine-tunes). Besides the zoo's three
tasks, `l2q_multi` is the target's questions with L1 answers: it tells a model that computes the
answer but writes it in the wrong script from one that cannot compute it, and `l2m_multi` (the
target's questions with L1 numerals, L1 answers) one that cannot read L2 numerals. A design
composes when no source reaches the bar on `comp_math_l2` and a merge does. Variants sharing a base mixture and
tying share one trained base (the same bytes a separate run trains).

    PYTHONPATH=. python benchmarks/composition_variants.py [--variants NAME ...] [--limit 200]

Writes benchmarks/results/composition_variants.json and prints the table (docs/zoo.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_util import RESULTS, machine, print_table  # noqa: E402

from evomerge.zoo.composition import BASE_MIX  # noqa: E402

INNER = tuple(range(1, 7))
ALL_LAYERS = tuple(range(8))
BASE_MIXES: dict[str, dict[str, float]] = {
    # the shipped base: L1 skills, and L2 rarely (copy, reversal, translation, one-step arithmetic)
    "shipped": dict(BASE_MIX),
    # L2 only as copy and translation (a script seen, never used for a task)
    "l2_low": {
        **{"l1_copy": 0.2, "l1_rev": 0.2, "l1_translate": 0.1, "l1_add": 0.2, "l1_sub": 0.2},
        **{"l2_copy": 0.05, "l2_translate": 0.05},
    },
    # reads L2 and answers in L1 (reversal and one-step arithmetic posed in L2), writes L2 only in translation
    "reads_l2": {
        **{"l1_copy": 0.15, "l1_rev": 0.15, "l1_translate": 0.1, "l1_add": 0.15, "l1_sub": 0.15},
        **{"l2q_rev": 0.08, "l2q_add": 0.06, "l2q_sub": 0.06, "l2_translate": 0.1},
    },
    # L2 written with L1 numerals only: L2's own digits are new vocabulary for the experts
    "l2_without_numerals": {
        **{"l1_copy": 0.15, "l1_rev": 0.15, "l1_translate_mixed": 0.1, "l1_add": 0.15, "l1_sub": 0.15},
        **{"l2m_copy": 0.05, "l2m_rev": 0.05, "l2m_add": 0.05, "l2m_sub": 0.05, "l2m_translate": 0.1},
    },
    # the same, and numbers compared (the larger of two) in L1 and in L2 with L1 numerals
    "l2_without_numerals_larger": {
        **{"l1_copy": 0.15, "l1_rev": 0.15, "l1_translate_mixed": 0.1, "l1_add": 0.1, "l1_sub": 0.1},
        **{"l1_larger": 0.1, "l2m_copy": 0.05, "l2m_rev": 0.05, "l2m_add": 0.05, "l2m_sub": 0.05},
        **{"l2m_translate": 0.05, "l2m_larger": 0.05},
    },
    # the shipped mixture without L2 reversal (the language expert's task)
    "shipped_without_l2_reversal": {k: v for k, v in BASE_MIX.items() if k != "comp_lang_l2"},
}
# name: (base mixture, tied, lang parts, math parts, overrides); None = every parameter.
# "rows" variants: the language expert learns only token rows (a script is its vocabulary).
CHAR_ROWS = ("char_rows",)
VARIANTS: dict[str, tuple[str, bool, Any, Any, dict[str, Any]]] = {
    "tied_l2_rows__inner": ("shipped", True, ("l2_rows",), INNER, {"lang_lr": 3e-3}),
    "untied_l2_rows__inner": ("shipped", False, ("l2_rows",), INNER, {"lang_lr": 3e-3}),
    "untied_char_rows__full": ("shipped", False, CHAR_ROWS, None, {}),
    "l2_low_l2_rows__inner": ("l2_low", False, ("l2_rows",), INNER, {"lang_lr": 3e-3}),
    "reads_l2_char_rows__inner": ("reads_l2", False, CHAR_ROWS, INNER, {}),
    "reads_l2_head__all_layers": ("reads_l2", False, ("head",), ALL_LAYERS, {"lang_lr": 3e-3}),
    "reads_l2_l2_rows__all_layers": ("reads_l2", False, ("l2_rows",), ALL_LAYERS, {"lang_lr": 3e-3}),
    "new_numerals_l2_rows__inner": ("l2_without_numerals", False, ("l2_rows",), INNER, {"lang_lr": 3e-3}),
    "new_numerals_full__full": ("l2_without_numerals", False, None, None, {}),
    "aligned_numerals_l2_rows__inner": (
        "l2_without_numerals",
        False,
        ("l2_rows",),
        INNER,
        {"lang_lr": 3e-3, "aligned": True},
    ),
    "aligned_numerals_l2_rows_lr3e-4__inner_no_l2_arith_replay": (
        "l2_without_numerals",
        False,
        ("l2_rows",),
        INNER,
        {"lang_lr": 3e-4, "aligned": True, "lang_replay": "no_l2_arithmetic"},
    ),
    "numbers_in_l2_l2_rows__inner": (
        "l2_without_numerals_larger",
        False,
        ("l2_rows",),
        INNER,
        {"lang_lr": 3e-3, "lang_mix": {"l2_copy": 0.2, "comp_lang_l2": 0.4, "l2_translate": 0.1, "l2_larger": 0.3}},
    ),
    "numbers_in_l2_full__full": (
        "l2_without_numerals_larger",
        False,
        None,
        None,
        {"lang_mix": {"l2_copy": 0.2, "comp_lang_l2": 0.4, "l2_translate": 0.1, "l2_larger": 0.3}},
    ),
    "no_l2_rev_l2_rows__all_layers_l1_replay": (
        "shipped_without_l2_reversal",
        False,
        ("l2_rows",),
        ALL_LAYERS,
        {"lang_lr": 3e-3, "math_replay": "l1"},
    ),
}
TASKS = ("comp_math_l2", "comp_math_l1", "comp_lang_l2", "l2q_multi", "l2m_multi")


def variant_config(name: str) -> Any:
    from evomerge.zoo.composition import CompConfig

    mix_name, tied, lang, math, over = VARIANTS[name]
    mix = BASE_MIXES[mix_name]
    cfg = CompConfig()
    math_replay = tuple(k for k in mix if k.startswith("l1_")) if over.get("math_replay") == "l1" else tuple(mix)
    lang_replay = tuple(mix)
    if over.get("lang_replay") == "no_l2_arithmetic":
        lang_replay = tuple(k for k in mix if not k.startswith("l2") or k.split("_")[-1] not in ("add", "sub"))
    return replace(
        cfg,
        tie_embeddings=tied,
        base_mix=mix,
        parts={"lang": lang, "math": math},
        replay_tasks={"lang": lang_replay, "math": math_replay},
        lang_aligned_numerals=over.get("aligned", False),
        lang_mix=over.get("lang_mix", cfg.lang_mix),
        expert_lr={**cfg.expert_lr, "lang": over.get("lang_lr", cfg.expert_lr["lang"])},
    )


def eval_rows(limit: int) -> dict[str, list[dict]]:
    from evomerge.zoo.composition import TO_L1, TO_L2_MIXED, read_split

    rows = {t: read_split(t, "test")[:limit] for t in TASKS[:3]}
    rows["l2q_multi"] = [{"prompt": r["prompt"], "answer": r["answer"].translate(TO_L1)} for r in rows["comp_math_l2"]]
    rows["l2m_multi"] = [
        {"prompt": r["prompt"].translate(TO_L1).translate(TO_L2_MIXED), "answer": r["answer"].translate(TO_L1)}
        for r in rows["comp_math_l2"]
    ]
    return rows


def scores(model: Any, state: dict[str, Any], rows: dict[str, list[dict]]) -> dict[str, float]:
    from evomerge.zoo.composition import exact_match

    model.load_state_dict(state)
    return {t: round(exact_match(model, rows[t]), 4) for t in TASKS}


def run_variants(names: Sequence[str], limit: int) -> list[dict[str, Any]]:
    import torch

    from evomerge.zoo import composition as comp

    torch.set_num_threads(1)
    splits = {n: {s: comp.read_split(n, s) for s in ("validation", "test")} for n in comp.EVAL_TASKS}
    held = comp.held_out(splits)
    rows = eval_rows(limit)
    bases: dict[tuple[str, bool], dict[str, torch.Tensor]] = {}
    out = []
    for name in names:
        started = time.perf_counter()
        cfg = variant_config(name)
        key = (VARIANTS[name][0], cfg.tie_embeddings)
        if key not in bases:
            bases[key] = comp.train_base(cfg, 0, held)
        states = {"base": bases[key]}
        states.update({n: comp.train_expert(cfg, 0, held, bases[key], n) for n in ("lang", "math")})
        model = comp.new_model(cfg, 0)
        record = {n: scores(model, s, rows) for n, s in states.items()}
        for weight in (0.5, 1.0):
            record[f"task_arithmetic_{weight}"] = scores(model, comp.task_arithmetic(states, weight), rows)
        out.append({"variant": name, "scores": record, "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(out[-1]), flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS / "composition_variants.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = run_variants(args.variants, args.limit)
    result = {
        "benchmark": "composition_variants",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": " ".join(["python", "benchmarks/composition_variants.py", *sys.argv[1:]]),
        "test_items_per_task": args.limit,
        "variants": {name: {"base_mix": BASE_MIXES[VARIANTS[name][0]], **_describe(name)} for name in args.variants},
        "results": results,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = []
    for r in results:
        s = r["scores"]
        best_source = max(s[m]["comp_math_l2"] for m in ("base", "lang", "math"))
        table.append(
            [
                r["variant"],
                f"{s['lang']['comp_lang_l2']:.3f}",
                f"{s['math']['comp_math_l1']:.3f}",
                f"{s['math']['l2q_multi']:.3f}",
                f"{best_source:.3f}",
                f"{s['task_arithmetic_0.5']['comp_math_l2']:.3f} / {s['task_arithmetic_1.0']['comp_math_l2']:.3f}",
            ]
        )
    print_table(
        f"composition designs, first {args.limit} test items",
        ["variant", "lang own", "math own", "math l2q_multi", "best source target", "TA 0.5 / 1.0 target"],
        table,
    )
    print(f"wrote {args.out}")


def _describe(name: str) -> dict[str, Any]:
    _, tied, lang, math, over = VARIANTS[name]
    return {"tied": tied, "lang_parts": lang, "math_parts": math, "overrides": over}


if __name__ == "__main__":
    main()
