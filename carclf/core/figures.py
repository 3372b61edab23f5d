"""Figures for runs and reports, as pure functions returning matplotlib Figures (no pyplot state).

    fig = confusion_figure(counts, classes, normalize=True)
    save_figure(fig, "results/confusion.png")

Figures are built on `matplotlib.figure.Figure` directly, so they are safe in
worker processes and never open a window; `save_figure` writes PNG atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from carclf.core.files import USER_FILE_MODE, atomic_write_bytes


def _bar_figure(labels: Sequence[str], values, *, ylabel: str, title: str, ylim=None) -> Figure:
    fig = Figure(figsize=(max(4.0, 0.5 * len(labels) + 2), 4), layout="constrained")
    ax = fig.add_subplot()
    positions = np.arange(len(labels))
    bars = ax.bar(positions, values, color="tab:blue")
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_xticks(positions, [str(x) for x in labels], rotation=45, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    return fig


def class_frequency_figure(table: pd.DataFrame, title: str = "Images per class") -> Figure:
    """Bars of `count` per `class` (the data part's class_table)."""
    return _bar_figure(table["class"].tolist(), table["count"].to_numpy(), ylabel="images", title=title)


def split_counts_figure(table: pd.DataFrame, title: str = "Images per class and split") -> Figure:
    """Grouped bars per class: train, val and test as split (left), and the training split after each
    family's balancing beside the train split as drawn (right). `table`: compare.split_counts_table."""
    balanced = [c for c in table.columns if c.startswith("train balanced")]
    classes = table["class"].astype(str).tolist()
    panels = [("as split (real images only)", ["train", "val", "test"]),
              ("training split, before and after balancing", ["train", *balanced])]
    width = min(14.0, max(7.0, 0.3 * len(classes) * (1 + len(balanced)) + 2))
    fig = Figure(figsize=(width, 7.5), layout="constrained")  # one panel above the other: readable when shrunk
    fig.suptitle(title)
    positions = np.arange(len(classes))
    for k, (subtitle, columns) in enumerate(panels, start=1):
        ax = fig.add_subplot(2, 1, k)
        bar = 0.8 / len(columns)
        for j, column in enumerate(columns):
            label = "train (before balancing)" if (k == 2 and column == "train") else column
            ax.bar(positions + (j - (len(columns) - 1) / 2) * bar, table[column].to_numpy(), bar, label=label)
        ax.set_xticks(positions, classes, rotation=45, ha="right")
        ax.set_ylabel("images")
        ax.set_title(subtitle)
        ax.legend(fontsize=8)
    return fig


def per_class_f1_figure(report: pd.DataFrame, title: str = "Per-class F1") -> Figure:
    """Bars of `f1` per `class` (metrics.per_class_report)."""
    return _bar_figure(report["class"].tolist(), report["f1"].to_numpy(), ylabel="F1", title=title, ylim=(0, 1.05))


def _draw_confusion(fig: Figure, ax, counts, classes: Sequence[str], normalize: bool, title: str) -> None:
    counts = np.asarray(counts)
    rows = counts.sum(axis=1, keepdims=True)
    values = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0) if normalize else counts
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else max(int(values.max()), 1))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, list(classes), rotation=45, ha="right")
    ax.set_yticks(ticks, list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = 0.5 * (1 if normalize else values.max())  # white text on dark cells
    for i, j in np.ndindex(values.shape):
        text = f"{values[i, j]:.2f}" if normalize else str(int(values[i, j]))
        colour = "white" if values[i, j] > threshold else "black"
        ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9 if len(classes) <= 12 else 7)


def _confusion_side(n_classes: int) -> float:
    return max(4.0, 0.45 * n_classes + 2.5)


def confusion_figure(counts, classes: Sequence[str], normalize: bool = True, title: str | None = None) -> Figure:
    """Heatmap of a confusion matrix (rows: true class), each cell annotated; row-normalised by default."""
    side = _confusion_side(len(classes))
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    default = "Confusion matrix (row-normalised)" if normalize else "Confusion matrix (counts)"
    _draw_confusion(fig, fig.add_subplot(), counts, classes, normalize, title or default)
    return fig


def confusion_grid_figure(matrices: Mapping[str, tuple], normalize: bool = True, ncols: int = 3) -> Figure:
    """One confusion heatmap per name ({name: (counts, classes)}), side by side, wrapping after `ncols`."""
    if not matrices:
        raise ValueError("confusion_grid_figure needs at least one matrix")
    n = len(matrices)
    cols = min(ncols, n)
    rows = -(-n // cols)
    side = _confusion_side(max(len(classes) for _, classes in matrices.values()))
    fig = Figure(figsize=((side + 1) * cols, side * rows), layout="constrained")
    for k, (name, (counts, classes)) in enumerate(matrices.items(), start=1):
        _draw_confusion(fig, fig.add_subplot(rows, cols, k), counts, classes, normalize, str(name))
    return fig


def training_curves_figure(history: Sequence[Mapping[str, float]], title: str = "Training curves") -> Figure:
    """Losses (keys ending in 'loss') on the left, scores (accuracy, F1...) on the right, per epoch."""
    frame = pd.DataFrame(list(history))
    if frame.empty:
        raise ValueError("training_curves_figure needs at least one epoch of history")
    epochs = frame["epoch"] if "epoch" in frame else pd.Series(np.arange(1, len(frame) + 1))
    numeric = [c for c in frame.columns if c != "epoch" and pd.api.types.is_numeric_dtype(frame[c])]
    panels = {
        "loss": [c for c in numeric if c.endswith("loss")],
        # scores in [0, 1]; other numbers (learning rate, seconds) have other scales and stay out
        "score": [c for c in numeric if c.endswith(("accuracy", "_macro", "_weighted"))],
    }
    fig = Figure(figsize=(12, 4), layout="constrained")
    fig.suptitle(title)
    for k, (ylabel, columns) in enumerate(panels.items(), start=1):
        ax = fig.add_subplot(1, 2, k)
        for column in columns:
            # validation dashed, training solid: the gap between them is what a reader looks for
            ax.plot(epochs, frame[column], marker="o", markersize=3, label=column,
                    linestyle="--" if column.startswith("val_") else "-")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        if columns:  # beside the curves, never over them (a network logs a dozen scores)
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return fig


def metric_bars_figure(df: pd.DataFrame, metrics: Sequence[str], title: str = "Models compared") -> Figure:
    """Grouped bars: one group per row of `df` (its 'model' column), one bar per metric, with error bars
    from '<metric>_std' columns where present."""
    missing = [m for m in ["model", *metrics] if m not in df.columns]
    if missing:
        raise ValueError(f"metric_bars_figure: columns {missing} missing; have {list(df.columns)}")
    labels = df["model"].astype(str).tolist()
    positions = np.arange(len(labels))
    width = 0.8 / max(len(metrics), 1)
    fig = Figure(figsize=(max(5.0, 1.2 * len(labels) * max(1, len(metrics) / 2) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    for k, metric in enumerate(metrics):
        errors = df[f"{metric}_std"].to_numpy() if f"{metric}_std" in df.columns else None
        offset = (k - (len(metrics) - 1) / 2) * width
        ax.bar(positions + offset, df[metric].to_numpy(), width, yerr=errors, capsize=3, label=metric)
    ax.set_xticks(positions, labels, rotation=30, ha="right")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def optimization_history_figure(history: pd.DataFrame, metric: str, title: str = "Optimisation history") -> Figure:
    """Each trial's `metric` (dots) and the best so far (steps), against trial number and against wall time.

    `history` columns: number, value, best_so_far (in trial-number order), minutes (when the trial
    finished, from the sweep's first start) and best_by_time (the best among trials finished by then).
    """
    missing = [c for c in ("number", "value", "best_so_far", "minutes", "best_by_time") if c not in history.columns]
    if missing:
        raise ValueError(f"optimization_history_figure: columns {missing} missing")
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    fig.suptitle(title)
    by_time = history.sort_values("minutes", kind="stable")
    for k, (frame, x, best, xlabel) in enumerate(((history, "number", "best_so_far", "trial number"),
                                                  (by_time, "minutes", "best_by_time", "minutes since the first trial")),
                                                 start=1):
        ax = fig.add_subplot(1, 2, k)
        ax.plot(frame[x], frame["value"], "o", color="tab:blue", alpha=0.6, label=metric)
        ax.step(frame[x], frame[best], where="post", color="tab:red", label="best so far")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        if x == "number":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            ax.set_xlim(left=0)  # the sweep starts at minute 0
        ax.legend(fontsize=8)
    return fig


def pareto_front_figure(points: pd.DataFrame, x: str, y: str, *, marked: Sequence[str] = (),
                        title: str = "Pareto front") -> Figure:
    """Every trial as a point (`x` against `y`), one colour per family (column `family`); the Pareto front
    (rows with `on_front`) joined by a line; rows whose `run_id` is in `marked` ringed and labelled."""
    missing = [c for c in ("family", "run_id", "on_front", x, y) if c not in points.columns]
    if missing:
        raise ValueError(f"pareto_front_figure: columns {missing} missing")
    fig = Figure(figsize=(7, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for family, rows in points.groupby("family", sort=True):
        ax.scatter(rows[x], rows[y], s=28, alpha=0.75, label=str(family))
    front = points[points["on_front"].astype(bool)].sort_values(x, kind="stable")
    ax.plot(front[x], front[y], "-o", color="black", linewidth=1, markersize=3, label="Pareto front")
    chosen = points[points["run_id"].isin(list(marked))]
    if len(chosen):
        ax.scatter(chosen[x], chosen[y], s=160, facecolors="none", edgecolors="tab:red", linewidths=1.5,
                   label="retested choice")
        for _, r in chosen.iterrows():
            # labels point inwards, away from the nearest edge, so none runs past the axes
            ax.annotate(str(r["family"]), (r[x], r[y]), textcoords="offset points", fontsize=8,
                        **_inward(points, x, y, r), annotation_clip=False)
    values = points[x].to_numpy(dtype=float)
    if len(values) and values.min() > 0 and values.max() / values.min() > 20:
        ax.set_xscale("log")  # latencies of a backbone and of a small CNN differ by decades
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def _inward(points: pd.DataFrame, x: str, y: str, row) -> dict:
    """Offset and alignment of a point's label: towards the middle of the data on both axes."""
    xs, ys = points[x].astype(float), points[y].astype(float)
    right = row[x] <= xs.median()
    up = row[y] <= ys.median()
    return {"xytext": (6 if right else -6, 6 if up else -6), "ha": "left" if right else "right",
            "va": "bottom" if up else "top"}


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write `fig` as PNG to `path` atomically (a temp file in the same folder, then os.replace); the umask applies."""

    target = Path(path)
    atomic_write_bytes(target, lambda f: fig.savefig(f, format="png", dpi=dpi), mode=USER_FILE_MODE)
    return target
