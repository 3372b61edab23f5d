"""Figures a person can read: every text of every sweep and run figure clear of the others, names whole,
the worst trial drawn in a visible colour, whole trial numbers, minutes from 0, labels inside the axes.

The figures are drawn from a small sweep's Optuna study (the shape `sweeps.search.studies.family_study` builds:
family-prefixed names, log ranges, a choice with None) and small tables; matplotlib reports each text's
box on the canvas (`Text.get_window_extent`).
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba
from matplotlib.text import Text

FAMILY, METRIC = "svm_rbf", "val_f1_macro"
N_TRIALS = 24  # enough for the importance figure (sweeps.analysis.explain.MIN_IMPORTANCE_TRIALS)


def _study():
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    space = {f"{FAMILY}.C": FloatDistribution(0.1, 100, log=True),
             f"{FAMILY}.gamma_factor": FloatDistribution(0.5, 5.0, log=True),  # one decade: minor ticks labelled
             f"{FAMILY}.augment_strength": CategoricalDistribution([0.0, 0.3]),
             f"{FAMILY}.samples_per_class": CategoricalDistribution([None, 60])}
    rng = np.random.default_rng(0)
    for i in range(N_TRIALS):
        point = {f"{FAMILY}.C": float(10 ** rng.uniform(-1, 2)), f"{FAMILY}.gamma_factor": float(0.5 * 10 ** rng.uniform(0, 1)),
                 f"{FAMILY}.augment_strength": [0.0, 0.3][i % 2], f"{FAMILY}.samples_per_class": [None, 60][i % 2]}
        value = 0.1 if i == 0 else float(rng.uniform(0.3, 0.9))  # the default trial scores worst
        study.add_trial(optuna.trial.create_trial(params=point, distributions=space, value=value,
                                                  user_attrs={"trial_id": f"t{i}", "run_id": f"r{i}"}))
    return study


@pytest.fixture(scope="module")
def sweep_figures():
    from sweeps.analysis.explain import FamilyAnalysis, _history, _importance, family_figures

    study = _study()
    done = study.trials
    history = _history(done, "max", 0)
    family = FamilyAnalysis(family=FAMILY, trials=N_TRIALS, finished=N_TRIALS, best=None, importance=pd.DataFrame(),
                            history=history, choices=pd.DataFrame())
    family.importance, _ = _importance(study, len(done))
    return family_figures(study, METRIC, family)


def _renderer(fig):
    """The figure drawn on an Agg canvas (carclf's figures are made without one) and its renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _texts(fig) -> list[Text]:
    """The texts drawn: titles, axis labels, tick labels of ticks in view, annotations, legends."""
    _renderer(fig)
    out = [t for t in (fig._suptitle,) if t is not None]
    for ax in fig.axes:
        out += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            ticks = [*axis.get_major_ticks(), *axis.get_minor_ticks()]
            out += [label for tick in ticks if low - 1e-9 <= tick.get_loc() <= high + 1e-9
                    for label in (tick.label1, tick.label2)]
        legend = ax.get_legend()
        if legend is not None:
            out += legend.get_texts()
    return [t for t in out if t.get_visible() and t.get_text().strip()]


def overlapping_texts(fig, slack: float = 1.0) -> list[tuple[str, str]]:
    renderer = _renderer(fig)
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in _texts(fig)]
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2)
            if min(ba.x1, bb.x1) - max(ba.x0, bb.x0) > slack and min(ba.y1, bb.y1) - max(ba.y0, bb.y0) > slack]


def _run_figures():
    from carclf.core.figures import optimization_history_figure, pareto_front_figure, training_curves_figure

    rows = [{"epoch": e, "train_loss": 1.5 / e, "val_loss": 1.6 / e, **{f"{s}_{m}": 0.1 * e for s in ("train", "val")
                                                                            for m in ("accuracy", "f1_macro")},
             **{f"val_{m}": 0.09 * e for m in ("precision_macro", "recall_macro", "f1_weighted", "top3_accuracy",
                                               "balanced_accuracy", "precision_weighted", "recall_weighted")}}
            for e in range(1, 7)]
    history = pd.DataFrame({"number": range(6), "value": [0.2, 0.5, 0.4, 0.7, 0.6, 0.8], "minutes": np.linspace(0.16, 3, 6)})
    history["best_so_far"] = history["best_by_time"] = history["value"].cummax()
    points = pd.DataFrame({"run_id": list("abcdef"), "family": ["svm_rbf", "svm_rbf", "simple_cnn", "simple_cnn",
                                                                "svm_linear", "svm_linear"],
                           "val_f1_macro": [0.86, 0.75, 0.30, 0.28, 0.74, 0.70],
                           "infer_ms_per_img": [4.7, 4.9, 0.4, 0.5, 4.6, 86.9], "on_front": [1, 0, 1, 0, 0, 0]})
    return {"curves": training_curves_figure(rows, title="svm_rbf: training curves"),
            "history": optimization_history_figure(history, METRIC),
            "pareto": pareto_front_figure(points, "infer_ms_per_img", "val_f1_macro", marked=["a", "c", "f"])}


@pytest.mark.slow
def test_no_text_of_a_sweep_figure_overlaps_another(sweep_figures):
    assert set(sweep_figures) == {"history", "importance", "parallel", "slice"}
    for name, fig in sweep_figures.items():
        assert overlapping_texts(fig) == [], name


def test_no_text_of_a_run_or_report_figure_overlaps_another():
    for name, fig in _run_figures().items():
        assert overlapping_texts(fig) == [], name


@pytest.mark.slow
def test_sweep_figures_name_their_family_and_every_parameter_whole(sweep_figures):
    for name in ("importance", "parallel", "slice"):
        fig = sweep_figures[name]
        assert fig._suptitle.get_text().startswith(f"{FAMILY}: "), name
        texts = [t.get_text() for t in _texts(fig)]
        assert not [t for t in texts if t.endswith("...") or "Plot" in t], (name, texts)
    parallel = [t.get_text() for t in _texts(sweep_figures["parallel"])]
    assert {"C", "gamma_factor", "augment_strength", "samples_per_class", METRIC} <= set(parallel)


def _luminance(rgba) -> float:
    r, g, b, _ = to_rgba(rgba)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


@pytest.mark.slow
def test_the_worst_trial_is_drawn_in_a_visible_colour_and_trial_numbers_are_whole(sweep_figures):
    for name in ("parallel", "slice"):
        fig = sweep_figures[name]
        for ax in fig.axes:
            assert to_rgba(ax.get_facecolor()) == to_rgba("white") or ax.get_label() == "<colorbar>"
            for collection in ax.collections:
                if collection.get_array() is not None:
                    lowest = collection.cmap(collection.norm(np.nanmin(collection.get_array())))
                    assert _luminance(lowest) < 0.8, name  # not white on white
    colourbar = next(ax for ax in sweep_figures["slice"].axes if ax.get_ylabel() == "Trial")
    _renderer(sweep_figures["slice"])
    ticks = [tick.label2.get_text() for tick in colourbar.yaxis.get_major_ticks()
             if 0 <= tick.get_loc() <= max(colourbar.yaxis.get_view_interval())]
    assert ticks and all(t.lstrip("−-").isdigit() for t in ticks), ticks


def test_minutes_start_at_zero_the_legend_sits_beside_the_curves_and_labels_stay_inside():
    figures = _run_figures()
    minutes = figures["history"].axes[1]
    assert minutes.get_xlim()[0] == 0
    curves = figures["curves"]
    renderer = _renderer(curves)
    for ax in curves.axes:
        legend, plot = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
        assert legend.x0 >= plot.x1  # beside the curves, not over them
    assert "val_loss" in [t.get_text() for t in curves.axes[0].get_legend().get_texts()]
    pareto = figures["pareto"]
    renderer = _renderer(pareto)
    box = pareto.axes[0].get_window_extent(renderer)
    for label in pareto.axes[0].texts:
        inside = label.get_window_extent(renderer)
        assert box.x0 <= inside.x0 and inside.x1 <= box.x1 and box.y0 <= inside.y0 and inside.y1 <= box.y1, \
            label.get_text()
