"""The comparison's plots: validation loss against KV-cache bytes per token (with the Pareto frontier) and against
parameters, and the training-loss curves of every run. Each takes results.csv's rows (experiments.study.aggregate)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import EngFormatter

from experiments.study import RUNS_DIR, scatter_metric, separate_labels


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (lower is better in each), by ascending x."""
    order = sorted(range(len(points)), key=lambda i: points[i])
    front, best_y = [], float("inf")
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def _colors(rows: Sequence[Mapping[str, Any]], groups: Mapping[str, str] | None) -> tuple[list, dict]:
    """A colour per row (one per group when `groups` maps variant -> group, else one per row) and the legend."""
    keys = [groups.get(row["variant"], "other") if groups else row["label"] for row in rows]
    palette = plt.get_cmap("tab10" if len(set(keys)) <= 10 else "tab20")
    by_key = {key: palette(i % palette.N) for i, key in enumerate(dict.fromkeys(keys))}
    return [by_key[key] for key in keys], by_key


def plot_frontier(rows: Sequence[Mapping[str, Any]], caption: str, groups: Mapping[str, str] | None = None):
    """Validation loss against KV-cache bytes per token (left; black rings mark the Pareto-optimal plans, a
    dashed line joins them) and against parameters (right). Error bars: one standard deviation over seeds.
    Recurrent mixers keep a constant-size state, so they sit at 0 bytes per token."""
    fig, (kv_ax, params_ax) = plt.subplots(1, 2, figsize=(13, max(5.0, 0.3 * len(rows))), sharey=True)
    colors, legend = _colors(rows, groups)
    for ax, column in ((kv_ax, "kv_cache_bytes_per_token"), (params_ax, "params")):
        scatter_metric(ax, rows, column, colors=colors, fontsize=7)
    points = [(float(row["kv_cache_bytes_per_token"]), float(row["val_loss_mean"])) for row in rows]
    front = pareto_front(points)
    # Rings as well as the line: a frontier of one plan has no line, and its legend entry must still show.
    kv_ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "k--", marker="o", markersize=12,
               markerfacecolor="none", alpha=0.5, zorder=0, label="Pareto frontier")
    if groups:
        for name, color in legend.items():
            kv_ax.plot([], [], "o", color=color, label=name)
    kv_ax.legend(fontsize=8)
    kv_ax.set_xlabel("KV-cache bytes per token (decode; 0: constant-size recurrent state)")
    params_ax.set_xlabel("parameters")
    params_ax.xaxis.set_major_formatter(EngFormatter())  # 150k, not 150000: six-digit ticks run together
    kv_ax.set_ylabel("validation loss (nats/token)")
    fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    for ax in (kv_ax, params_ax):  # the layout moved the points: place the labels again
        separate_labels(ax)
    return fig


def training_curves(out: Path, row: Mapping[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(steps, train loss) of each seed's run of `row`, from runs/<variant>-s<seed>/metrics.jsonl."""
    curves = []
    for seed in str(row["seeds"]).split():
        path = Path(out) / RUNS_DIR / f"{row['variant']}-s{seed}" / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
        curves.append((np.array([s for s, _ in train]), np.array([loss for _, loss in train])))
    return curves


def plot_loss_curves(out: Path, rows: Sequence[Mapping[str, Any]], caption: str,
                     groups: Mapping[str, str] | None = None):
    """Training loss against step, one line per plan (the mean over seeds where they were logged alike)."""
    fig, ax = plt.subplots(figsize=(9, 5))
    colors, _ = _colors(rows, groups)
    styles = ("-", "--", ":", "-.")
    for i, (row, color) in enumerate(zip(rows, colors)):
        curves = training_curves(out, row)
        steps = curves[0][0]
        losses = np.mean([loss for _, loss in curves], axis=0) if all(
            np.array_equal(s, steps) for s, _ in curves) else curves[0][1]
        ax.plot(steps, losses, styles[i % len(styles)] if groups else "-", color=color, label=row["label"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(caption, fontsize=9)
    fig.tight_layout()
    return fig
