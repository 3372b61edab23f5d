"""Tests for carclf/core/figures.py: the right axes, bars and labels, and atomic PNG files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from carclf.core.figures import (
    class_frequency_figure,
    confusion_figure,
    confusion_grid_figure,
    metric_bars_figure,
    per_class_f1_figure,
    save_figure,
    training_curves_figure,
)

CLASSES = ["bus", "pickup", "sedan"]
COUNTS = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 0]])  # the last class never occurs


def _ticklabels(ax, axis: str = "x") -> list[str]:
    labels = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [t.get_text() for t in labels]


def _cell_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_class_frequency_bars_follow_the_table():
    table = pd.DataFrame({"index": [0, 1, 2], "class": CLASSES, "count": [40, 12, 7]})
    fig = class_frequency_figure(table)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    assert [p.get_height() for p in ax.patches] == [40, 12, 7]
    assert _ticklabels(ax) == CLASSES


def test_per_class_f1_bars():
    report = pd.DataFrame({"class": CLASSES, "precision": [1, 0.5, 0], "recall": [1, 1, 0], "f1": [1.0, 2 / 3, 0.0]})
    ax = per_class_f1_figure(report).axes[0]
    assert [p.get_height() for p in ax.patches] == pytest.approx([1.0, 2 / 3, 0.0])
    assert _ticklabels(ax) == CLASSES


@pytest.mark.parametrize("normalize", [True, False])
def test_confusion_heatmap_is_labelled_and_annotated(normalize):
    fig = confusion_figure(COUNTS, CLASSES, normalize=normalize)
    heatmap = fig.axes[0]  # the second axes is the colour bar
    assert len(fig.axes) == 2
    assert _ticklabels(heatmap) == CLASSES and _ticklabels(heatmap, "y") == CLASSES
    texts = _cell_texts(heatmap)
    assert len(texts) == COUNTS.size
    if normalize:
        assert texts[:3] == ["0.83", "0.17", "0.00"] and texts[-3:] == ["0.00"] * 3
    else:
        assert texts == [str(v) for v in COUNTS.ravel()]


def test_confusion_grid_puts_one_heatmap_per_model():
    grid = {"svm": (COUNTS, CLASSES), "vgg16": (COUNTS.T, CLASSES), "cnn": (np.eye(2, dtype=int), ["a", "b"])}
    fig = confusion_grid_figure(grid)
    heatmaps = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in heatmaps] == ["svm", "vgg16", "cnn"]
    assert len(_cell_texts(heatmaps[2])) == 4
    with pytest.raises(ValueError):
        confusion_grid_figure({})


def test_training_curves_split_losses_from_scores():
    history = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_f1_macro": 0.2 * e, "val_accuracy": 0.25 * e, "lr": 1e-3}
        for e in (1, 2, 3)
    ]
    fig = training_curves_figure(history)
    losses, scores = fig.axes
    assert sorted(line.get_label() for line in losses.lines) == ["train_loss", "val_loss"]
    assert sorted(line.get_label() for line in scores.lines) == ["val_accuracy", "val_f1_macro"]
    np.testing.assert_allclose(losses.lines[0].get_xdata(), [1, 2, 3])
    with pytest.raises(ValueError):
        training_curves_figure([])


def test_metric_bars_group_by_model_with_error_bars():
    df = pd.DataFrame(
        {
            "model": ["svm", "vgg16"],
            "val_f1_macro": [0.9, 0.8],
            "val_f1_macro_std": [0.02, 0.05],
            "val_accuracy": [0.92, 0.81],
        }
    )
    ax = metric_bars_figure(df, ["val_f1_macro", "val_accuracy"]).axes[0]
    assert len(ax.patches) == 4  # 2 models x 2 metrics
    assert _ticklabels(ax) == ["svm", "vgg16"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["val_f1_macro", "val_accuracy"]
    f1_bars, accuracy_bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert accuracy_bars.errorbar is None  # no val_accuracy_std column
    segments = f1_bars.errorbar.lines[2][0].get_segments()
    assert [seg[1][1] - seg[0][1] for seg in segments] == pytest.approx([0.04, 0.10])  # +-std
    with pytest.raises(ValueError, match="test_f1_macro"):
        metric_bars_figure(df, ["test_f1_macro"])


def test_save_figure_writes_a_png_atomically(tmp_path):
    target = tmp_path / "figs" / "confusion.png"
    result = save_figure(confusion_figure(COUNTS, CLASSES), target)
    assert result == target
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in target.parent.iterdir()] == ["confusion.png"]  # no temp file left behind


def test_save_figure_leaves_no_partial_file_when_writing_fails(tmp_path):
    class Broken(Figure):
        def savefig(self, *args, **kwargs):
            raise RuntimeError("disk full")

    target = tmp_path / "broken.png"
    with pytest.raises(RuntimeError):
        save_figure(Broken(), target)
    assert list(tmp_path.iterdir()) == []
