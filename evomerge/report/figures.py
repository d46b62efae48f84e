"""The report's figures, drawn with matplotlib's Agg backend (no display, same bytes on any machine).

Each `draw_*` function takes the plain data of `evomerge.report.data` and returns the matplotlib
figure (tests read the plotted data back from its axes); `to_png` turns it into bytes, so the
caller decides where (and how atomically) they are written.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: never try to open a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from evomerge.report.data import FitnessSeries, Heatmap, PathStep  # noqa: E402

DPI = 110


def to_png(fig: Any) -> bytes:
    """PNG bytes without a timestamp or version in the metadata; the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def draw_fitness(stages: Sequence[tuple[str, FitnessSeries]], split: str) -> Any:
    """Every evaluation as a point (failures as red crosses at their penalty fitness), the best so
    far as a step line, and each generation's mean with a +-1 std band (clipped to min/max)."""
    fig, axes = plt.subplots(1, len(stages), figsize=(7.5 * len(stages), 4.2), squeeze=False)
    for ax, (name, series) in zip(axes[0], stages, strict=True):
        ok = ~series.failed
        ax.fill_between(
            series.generation_x,
            series.generation_low,
            series.generation_high,
            color="tab:blue",
            alpha=0.15,
            label="generation mean ± std",
        )
        ax.plot(series.generation_x, series.generation_mean, "o-", color="tab:blue", lw=1.2, ms=4)
        ax.scatter(series.x[ok], series.fitness[ok], s=14, color="tab:gray", alpha=0.8, label="evaluation")
        if series.failed.any():
            ax.scatter(
                series.x[series.failed],
                series.fitness[series.failed],
                s=28,
                marker="x",
                color="tab:red",
                label=f"failed ({int(series.failed.sum())}, penalty fitness)",
            )
        ax.step(series.x, series.best_so_far, where="post", color="tab:green", lw=2, label="best so far")
        ax.set_xlabel("evaluation (journal order)")
        ax.set_ylabel(f"fitness ({split} split)")
        ax.set_title(f"fitness over evaluations{'' if name == 'search' else f' - {name} stage'}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    return fig


def draw_heatmaps(maps: Sequence[Heatmap], title: str) -> Any:
    """One panel per parameter kind; each cell is printed, since colours alone are hard to read."""
    columns = max(len(m.columns) for m in maps)
    rows = max(len(m.rows) for m in maps)
    size = (max(5.0, 1.0 + 0.9 * columns), 0.6 + len(maps) * (0.9 + 0.45 * rows))
    fig, axes = plt.subplots(len(maps), 1, figsize=size, squeeze=False)
    for ax, heatmap in zip(axes[:, 0], maps, strict=True):
        values = np.ma.masked_invalid(heatmap.values)
        image = ax.imshow(
            values,
            cmap="viridis",
            aspect="auto",
            vmin=min(0.0, float(values.min())),
            vmax=max(1.0, float(values.max())),
        )
        ax.set_xticks(range(len(heatmap.columns)), heatmap.columns)
        ax.set_yticks(range(len(heatmap.rows)), heatmap.rows)
        ax.set_title(heatmap.kind)
        if len(heatmap.columns) <= 24:
            for (r, c), value in np.ndenumerate(heatmap.values):
                if np.isfinite(value):
                    ax.text(
                        c,
                        r,
                        f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if value < 0.5 * (image.norm.vmin + image.norm.vmax) else "black",
                    )
        fig.colorbar(image, ax=ax, label=heatmap.kind, fraction=0.04, pad=0.02)
    axes[-1, 0].set_xlabel("layer group")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def draw_path(steps: Sequence[PathStep], title: str, names: dict[str, str] | None = None) -> Any:
    """x = step, y = layer index within its model, colour = model; transitions between models are
    annotated with the scale applied to the hidden state entering the new layer. `names`: legend
    labels per model path (default: the folder names)."""
    models = list(dict.fromkeys(s.model for s in steps))
    labels = [(names or {}).get(m, short) for m, short in zip(models, _short_names(models), strict=True)]
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(steps) + 2.5), 4.0))
    x = np.arange(len(steps))
    y = np.array([s.layer for s in steps])
    ax.plot(x, y, color="lightgray", lw=1, zorder=1)
    for mi, model in enumerate(models):
        mask = np.array([s.model == model for s in steps])
        ax.scatter(
            x[mask], y[mask], s=60, color=colours(mi % 10), label=labels[mi], zorder=2, edgecolor="black", linewidth=0.5
        )
    for i, step in enumerate(steps):
        if i and (step.model != steps[i - 1].model or step.scale != 1.0):
            ax.annotate(
                f"×{step.scale:.3g}",
                (i, step.layer),
                textcoords="offset points",
                xytext=(0, 9),
                ha="center",
                fontsize=7,
            )
    ax.set_xlabel("step on the inference path")
    ax.set_ylabel("layer index in its source model")
    ax.set_yticks(range(int(y.max()) + 1))
    ax.set_xticks(x if len(steps) <= 40 else x[:: max(1, len(steps) // 20)])
    ax.set_ylim(-0.7, y.max() + 0.9)
    ax.grid(alpha=0.3)
    ax.legend(title="source model", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def draw_pareto(front: Sequence[dict[str, Any]], background: Sequence[dict[str, float]] | None = None) -> Any:
    """The non-dominated evaluations, objective against objective (every pair, up to four objectives);
    `background`, when given, is every evaluation's objectives drawn in grey behind the front."""
    names = list(front[0]["objectives"])[:4]
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]] or [(names[0], names[0])]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.6 * len(pairs), 4.0), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs, strict=True):
        if background:
            ax.scatter(
                [p[a] for p in background if a in p and b in p],
                [p[b] for p in background if a in p and b in p],
                s=10,
                color="lightgray",
                label="all evaluations",
            )
        xs = np.array([e["objectives"][a] for e in front])
        ys = np.array([e["objectives"][b] for e in front])
        order = np.argsort(xs)
        ax.plot(xs[order], ys[order], "o-", color="tab:purple", label="Pareto front")
        ax.set_xlabel(a)
        ax.set_ylabel(b)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Pareto front ({len(front)} non-dominated evaluations)", fontsize=10)
    fig.tight_layout()
    return fig


def _short_names(models: Sequence[str]) -> list[str]:
    from evomerge.search.space.ps import model_labels

    return model_labels(list(models))
