"""Why a sweep found what it found: per family, hyperparameter importance, optimisation history,
parallel coordinates and slices; across families, the Pareto front. Computed by Optuna's own tools.

    carclf analyze quickstart          # a finished, running or interrupted sweep: what MLflow holds now
    analysis = analyze_sweep("quickstart")

Every sweep runs it at its end. Each family's finished trials become an in-memory Optuna study
(sweeps.search.studies rebuilds their draws from MLflow and the sweep file); importance is Optuna's
PED-ANOVA (`optuna.importance`, conditional parameters such as an RBF-only gamma included), the
figures are `optuna.visualization.matplotlib`'s, except the history against wall time and the
Pareto front, which Optuna does not draw that way (carclf.core.figures). The Pareto front itself is
`Study.best_trials` of a multi-objective study over every finished trial.

The files go to `results/<name>/analysis/` and to the sweep's parent run under `analysis/`, where
`carclf report` reads them: `summary.json`, per family `<family>/importance.csv|png`,
`history.csv|png`, `parallel.png`, `slice.png`, `choices.csv`, and `pareto.csv|png`. Best values at the
edge of their search range (sweeps.analysis.edges) go to `results/<name>/edge_warnings.json` and the parent run.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import optuna
import pandas as pd
from optuna.distributions import CategoricalDistribution
from optuna.visualization import matplotlib as plots

from carclf.core.figures import optimization_history_figure, pareto_front_figure
from carclf.report.render import figure_png
from carclf.report.selection import resolve_sweep, sweep_client
from sweeps.analysis.edges import edge_lines, edge_warnings, write_edge_warnings
from sweeps.search.spec import SweepSpec
from sweeps.search.studies import SweepTrial, family_study, front_objectives, pareto_study, sweep_spec, sweep_trials

log = logging.getLogger(__name__)

ANALYSIS_DIR = "analysis"  # the folder on the parent run and under results/<name>/
SUMMARY = "summary.json"


@dataclass
class FamilyAnalysis:
    """One model entry's trials seen through Optuna: importance, history, figures (PNG bytes), choices."""

    family: str
    trials: int
    finished: int
    best: dict[str, Any] | None  # trial_id, run_id, value of the best finished trial
    importance: pd.DataFrame  # param, importance (sums to 1)
    history: pd.DataFrame  # number, trial_id, run_id, value, best_so_far, minutes, best_by_time
    choices: pd.DataFrame  # param, choice, trials, best, median: how each categorical choice fared
    figures: dict[str, bytes] = field(default_factory=dict)  # importance, history, parallel, slice
    notes: list[str] = field(default_factory=list)


@dataclass
class SweepAnalysis:
    name: str
    metric: str
    mode: str
    objectives: list[tuple[str, str]]
    families: dict[str, FamilyAnalysis]
    pareto: pd.DataFrame | None  # run_id, trial_id, family, <objective 1>, <objective 2>, on_front
    pareto_objectives: list[tuple[str, str]] | None
    pareto_png: bytes | None
    trials: int
    created: str
    edges: list[dict[str, Any]] = field(default_factory=list)  # sweeps.analysis.edges: best values at the edge of a range

    def summary(self) -> dict[str, Any]:
        """summary.json: what `carclf report` reads (figures and tables by their path under analysis/)."""
        families = {}
        for key, f in self.families.items():
            families[key] = {
                "trials": f.trials, "finished": f.finished, "best": f.best, "notes": f.notes,
                "importance": dict(zip(f.importance["param"], f.importance["importance"].astype(float))),
                "figures": {k: f"{key}/{k}.png" for k in f.figures},
                "tables": {k: f"{key}/{k}.csv" for k in ("importance", "history", "choices")}}
        return {"sweep": self.name, "metric": self.metric, "mode": self.mode, "created": self.created,
                "objectives": [list(o) for o in self.objectives], "trials": self.trials, "families": families,
                "pareto": None if self.pareto is None else {
                    "objectives": [list(o) for o in self.pareto_objectives], "table": "pareto.csv",
                    "figure": "pareto.png", "front_run_ids": self.pareto.loc[self.pareto["on_front"], "run_id"].tolist()}}


# ---------------------------------------------------------------------- the analysis (no MLflow here)


def analyze(spec: SweepSpec, trials: list[SweepTrial], name: str) -> SweepAnalysis:
    """The analysis of `trials` (sweeps.search.studies.sweep_trials) of the sweep `spec` describes."""
    with _optuna_quiet():
        start = min((t.start_ms for t in trials), default=0)
        families = {key: _family(spec, key, trials, start) for key in spec.models}
        objectives = front_objectives(spec, trials)
        pareto, png = (None, None) if objectives is None else _pareto(trials, objectives)
    return SweepAnalysis(name=name, metric=spec.metric, mode=spec.mode,
                         objectives=list(zip(spec.objective_names, spec.objective_modes)), families=families,
                         pareto=pareto, pareto_objectives=objectives if pareto is not None else None, pareto_png=png,
                         trials=len(trials), created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


@contextlib.contextmanager
def _optuna_quiet() -> Iterator[None]:
    """Optuna's importance evaluators and matplotlib plots are marked experimental; they are what we want."""

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            yield
        finally:
            optuna.logging.set_verbosity(level)


def _family(spec: SweepSpec, key: str, trials: list[SweepTrial], start_ms: int) -> FamilyAnalysis:
    own = [t for t in trials if t.family == key]
    study = family_study(spec, key, trials, spec.metric, spec.mode)
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    out = FamilyAnalysis(family=key, trials=len(own), finished=len(done), best=None,
                         importance=pd.DataFrame(columns=["param", "importance"]),
                         history=_history(done, spec.mode, start_ms), choices=_choices(done, spec.mode))
    if len(own) > len(done):
        out.notes.append(f"{len(own) - len(done)} of {len(own)} trials did not finish with {spec.metric} "
                         "(stopped early, failed or still running) and are left out")
    if not done:
        return out
    best = study.best_trial
    out.best = {"trial_id": best.user_attrs["trial_id"], "run_id": best.user_attrs["run_id"], "value": best.value}
    out.importance, note = _importance(study, len(done))
    if note:
        out.notes.append(note)
    out.figures = _figures(study, spec.metric, out)
    return out


def _history(done: list, mode: str, start_ms: int) -> pd.DataFrame:
    """Each finished trial's value with the best so far, in trial order and in the order trials finished."""
    columns = ["number", "trial_id", "run_id", "value", "best_so_far", "minutes", "best_by_time"]
    if not done:
        return pd.DataFrame(columns=columns)
    running = np.fmax.accumulate if mode == "max" else np.fmin.accumulate
    start = datetime.fromtimestamp(start_ms / 1000.0) if start_ms else done[0].datetime_start
    table = pd.DataFrame({
        "number": [t.number for t in done], "trial_id": [t.user_attrs["trial_id"] for t in done],
        "run_id": [t.user_attrs["run_id"] for t in done], "value": [t.value for t in done],
        "minutes": [((t.datetime_complete or t.datetime_start) - start).total_seconds() / 60.0 for t in done]})
    table["best_so_far"] = running(table["value"].to_numpy())
    by_time = table.sort_values("minutes", kind="stable")
    table.loc[by_time.index, "best_by_time"] = running(by_time["value"].to_numpy())
    return table[columns]


def _choices(done: list, mode: str) -> pd.DataFrame:
    """For each categorical parameter (backbone, kernel, batch size...), how its choices fared."""

    rows = []
    names = sorted({n for t in done for n, d in t.distributions.items() if isinstance(d, CategoricalDistribution)})
    for name in names:
        groups: dict[str, list[float]] = {}
        for t in done:
            if name in t.params:
                groups.setdefault(str(t.params[name]), []).append(t.value)
        for choice, values in groups.items():
            rows.append({"param": name, "choice": choice, "trials": len(values),
                         "best": max(values) if mode == "max" else min(values), "median": float(np.median(values))})
    table = pd.DataFrame(rows, columns=["param", "choice", "trials", "best", "median"])
    return table.sort_values(["param", "best"], ascending=[True, mode == "min"], kind="stable").reset_index(drop=True)


# PED-ANOVA (Watanabe et al., IJCAI 2023) ranks parameters by how the best tenth of the trials (Optuna's
# target_quantile 0.1) is spread compared with all of them, and needs at least 2 trials in a regime. Below 20
# finished trials the best tenth holds fewer than 2, so an "importance" would describe one or two lucky draws,
# not the space (Optuna's documentation prefers at least 5 in the top set, i.e. 50 trials).
MIN_IMPORTANCE_TRIALS = 20


def _evaluator():
    return optuna.importance.PedAnovaImportanceEvaluator()


def _importance(study, n_done: int) -> tuple[pd.DataFrame, str | None]:
    """PED-ANOVA importances (normalised to sum 1), or an empty table and the reason (too few trials among them)."""

    empty = pd.DataFrame(columns=["param", "importance"])
    searched = {n for t in study.trials for n in t.distributions}
    if not searched:
        return empty, "nothing was searched in this family: no importance to tell"
    if n_done < MIN_IMPORTANCE_TRIALS:
        return empty, (f"too few trials ({n_done}) to rank parameters: importance is withheld below "
                       f"{MIN_IMPORTANCE_TRIALS} finished trials, where the best tenth PED-ANOVA compares with the "
                       "rest holds fewer than the 2 trials it needs")
    if len({t.value for t in study.trials}) == 1:
        return empty, "every finished trial scored the same: no importance to tell"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            scores = optuna.importance.get_param_importances(study, evaluator=_evaluator())
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        return empty, f"importance could not be computed: {e}"
    table = pd.DataFrame({"param": list(scores), "importance": [float(v) for v in scores.values()]})
    # PED-ANOVA says when a parameter has too few trials in a regime: the reader should know it too
    said = sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)})
    return table, ("; ".join(said) or None)


def _png(fig) -> bytes:
    """A figure as PNG bytes; its pyplot figure (Optuna's plots go through pyplot) is closed."""
    import matplotlib.pyplot as plt  # pyplot where a figure is drawn, after the Agg backend is chosen

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _figures(study, metric: str, family: FamilyAnalysis) -> dict[str, bytes]:
    figures = family_figures(study, metric, family)
    history = figures.pop("history")
    return {"history": figure_png(history), **{k: _png(fig) for k, fig in figures.items()}}


def family_figures(study, metric: str, family: FamilyAnalysis) -> dict[str, Any]:
    """The family's matplotlib Figures: history (carclf's), importance, parallel coordinates and slices (Optuna's,
    made readable by `_readable`)."""
    import matplotlib  # the Agg backend is chosen where a figure is drawn, not when carclf is imported


    matplotlib.use("Agg")  # Optuna's plots go through pyplot: never a window, also where a display exists
    import matplotlib.pyplot as plt  # pyplot where a figure is drawn, after the Agg backend is chosen

    figures = {"history": optimization_history_figure(
        family.history, metric, title=f"{family.family}: {metric} per trial and best so far")}
    params = sorted({n for t in study.trials for n in t.distributions})
    numeric = sorted({n for t in study.trials for n, d in t.distributions.items()
                      if not isinstance(d, CategoricalDistribution)})
    # Optuna's plots switch pyplot's global style (ggplot); rc_context puts it back for every later figure.
    # A parameter with one value gives matplotlib identical axis limits, which it widens with a warning.
    with plt.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if not family.importance.empty:
            figures["importance"] = _readable(plots.plot_param_importances(study, evaluator=_evaluator(),
                                                                           target_name=metric),
                                              f"{family.family}: importance of each searched setting (PED-ANOVA)",
                                              family.family)
        if params and family.finished >= 2:
            figures["parallel"] = _readable(plots.plot_parallel_coordinate(study, target_name=metric),
                                            f"{family.family}: each finished trial's settings, coloured by {metric}",
                                            family.family, width=max(7.0, 1.9 * (len(params) + 1)),
                                            names=[metric, *params])
        if numeric and family.finished >= 2:
            figures["slice"] = _readable(plots.plot_slice(study, params=numeric, target_name=metric),
                                         f"{family.family}: {metric} against each searched number, coloured by "
                                         "trial", family.family, width=max(6.0, 3.6 * len(numeric)))
    return figures


def _readable(axes, title: str, family: str, width: float | None = None, names: list[str] | None = None):
    """An Optuna matplotlib plot made readable: the family in the title; parameter names whole, without the
    family's prefix; log axes labelled at their decades only (no crowded '2x10^0 3x10^0 ...'); a white
    background and a colour map whose low end is still blue, so the worst trial (often the default) shows;
    dots with an edge; a colour bar of trial numbers with whole-number ticks. `names`: the whole axis names of
    a parallel-coordinate plot (Optuna cuts them at 20 characters). Returns the Figure."""
    import matplotlib.pyplot as plt  # pyplot where a figure is drawn, after the Agg backend is chosen
    from matplotlib.colors import ListedColormap  # with pyplot, where a figure is drawn
    from matplotlib.ticker import MaxNLocator

    fig = np.ravel(axes)[0].figure
    for ax in fig.axes:  # Optuna's generic "Slice Plot" / "Parallel Coordinate Plot": one title, the family's
        ax.set_title("")
    fig.suptitle(title)
    if width:
        fig.set_size_inches(width, fig.get_size_inches()[1])
    visible = ListedColormap(plt.get_cmap("Blues")(np.linspace(0.4, 1.0, 256)))
    prefix = f"{family}."
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            if ax.get_ylabel() == "Trial":
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            continue
        ax.set_facecolor("white")
        ax.grid(True, color="0.88", linewidth=0.6)
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                _log_ticks(axis)
            axis.label.set_text(axis.label.get_text().removeprefix(prefix))
        if names and len(ax.get_xticks()) == len(names) and ax is np.ravel(axes)[0]:
            ax.set_xticks(ax.get_xticks(), [n.removeprefix(prefix) for n in names], rotation=20, ha="right")
        for collection in ax.collections:
            if collection.get_array() is not None:
                collection.set_cmap(visible)
            if type(collection).__name__ == "PathCollection":
                collection.set_edgecolor("0.3")
    return fig


def _log_ticks(axis) -> None:
    """A log axis labelled in plain numbers at 1, 2 and 5 times each power of ten when it spans two decades or
    less (at the powers alone when wider), its other ticks unlabelled: a few readable labels, never a row of them."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # with pyplot, where a figure is drawn

    low, high = sorted(v for v in axis.get_view_interval())
    decades = np.log10(high / low) if low > 0 else np.inf
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _pareto(trials: list[SweepTrial], objectives: list[tuple[str, str]]) -> tuple[pd.DataFrame | None, bytes | None]:
    """Every finished trial's two objective values, and which lie on the Pareto front (Optuna's best_trials)."""

    study = pareto_study(trials, objectives)
    if not study.trials:
        return None, None
    front = {t.user_attrs["run_id"] for t in study.best_trials}
    (y, _), (x, _) = objectives
    table = pd.DataFrame([{"run_id": t.user_attrs["run_id"], "trial_id": t.user_attrs["trial_id"],
                           "family": t.user_attrs["family"], y: t.values[0], x: t.values[1],
                           "on_front": t.user_attrs["run_id"] in front} for t in study.trials])
    png = figure_png(pareto_front_figure(table, x, y, title=f"{y} against {x}: every finished trial"))
    return table, png


# ---------------------------------------------------------------------- files and MLflow


def _files(analysis: SweepAnalysis) -> dict[str, bytes | str | pd.DataFrame]:
    files: dict[str, Any] = {SUMMARY: json.dumps(analysis.summary(), indent=2, default=str) + "\n"}
    for key, f in analysis.families.items():
        files.update({f"{key}/importance.csv": f.importance, f"{key}/history.csv": f.history,
                      f"{key}/choices.csv": f.choices})
        files.update({f"{key}/{name}.png": png for name, png in f.figures.items()})
    if analysis.pareto is not None:
        files["pareto.csv"] = analysis.pareto
        files["pareto.png"] = analysis.pareto_png
    return files


def write_analysis(analysis: SweepAnalysis, out_dir: Path) -> Path:
    """The analysis files in `out_dir` (results/<name>/analysis), replaced as a whole: filled in a
    temporary folder beside it, then swapped in, so a reader never sees half of one analysis."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        for rel, value in _files(analysis).items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(value, pd.DataFrame):
                value.to_csv(path, index=False)
            elif isinstance(value, bytes):
                path.write_bytes(value)
            else:
                path.write_text(value, encoding="utf-8")
        os.chmod(tmp, 0o755)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}-old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def run_analysis(spec: SweepSpec, client, info, out_dir: Path) -> SweepAnalysis:
    """Read the sweep's trials from MLflow, analyse them, write `out_dir` and log it to the parent run."""
    trials = sweep_trials(client, info)
    edges = edge_warnings(spec, trials)
    write_edge_warnings(edges, client, info)
    analysis = analyze(spec, trials, info.name)
    analysis.edges = edges
    write_analysis(analysis, out_dir)
    client.log_artifacts(info.parent_run_id, str(out_dir), ANALYSIS_DIR)
    return analysis


def analyze_finished_sweep(spec: SweepSpec, client, out_dir: Path) -> SweepAnalysis | None:
    """At the end of `carclf sweep`: the analysis on the parent run. A failure is reported, never fatal:
    the trials are safe in MLflow and `carclf analyze` can try again."""

    info = resolve_sweep(out_dir)
    try:
        analysis = run_analysis(spec, client, info, out_dir / ANALYSIS_DIR)
    except Exception as e:  # noqa: BLE001 - any failure here must leave the sweep's results alone
        log.warning("sweep analysis failed: %s", e)
        print(f"sweep analysis failed ({type(e).__name__}: {e}); try again with: carclf analyze {info.name}",
              flush=True)
        return None
    print(f"sweep analysis: {out_dir / ANALYSIS_DIR} (also on the parent run under {ANALYSIS_DIR}/)", flush=True)
    return analysis


def analyze_sweep(sweep: str | Path) -> SweepAnalysis:
    """`carclf analyze`: a sweep by name or results folder, finished or not, analysed from MLflow."""

    info = resolve_sweep(sweep)
    client = sweep_client(info)
    return run_analysis(sweep_spec(client, info), client, info, info.folder / ANALYSIS_DIR)


def _show(analysis: SweepAnalysis) -> str:
    lines = []
    for key, f in analysis.families.items():
        best = (f"best {analysis.metric} {f.best['value']:.4f} (trial {f.best['trial_id']})" if f.best
                else f"no finished trial with {analysis.metric}")
        lines.append(f"{key}: {f.trials} trial{'s' if f.trials != 1 else ''}, {f.finished} finished; {best}")
        if not f.importance.empty:
            shown = ", ".join(f"{p.split('.', 1)[-1]} {v:.2f}" for p, v in zip(f.importance["param"],
                                                                                 f.importance["importance"]))
            lines.append(f"  importance (PED-ANOVA): {shown}")
        for _, r in f.choices.iterrows():
            lines.append(f"  {r['param'].split('.', 1)[-1]}={r['choice']}: {r['trials']} trial{'s' if r['trials'] != 1 else ''}, "
                         f"best {r['best']:.4f}")
        lines += [f"  note: {n}" for n in f.notes]
    if analysis.pareto is not None:
        (y, _), (x, _) = analysis.pareto_objectives
        front = analysis.pareto[analysis.pareto["on_front"]].sort_values(x)
        lines.append(f"Pareto front ({y} against {x}), {len(front)} of {len(analysis.pareto)} finished trials:")
        lines += [f"  {r['family']} trial {r['trial_id']}: {y} {r[y]:.4f}, {x} {r[x]:.4g}" for _, r in front.iterrows()]
    return "\n".join(lines + edge_lines(analysis.edges))


def cli_analyze(args) -> int:
    """`carclf analyze SWEEP`: importance, history, parallel coordinates, slices and the Pareto front."""
    analysis = analyze_sweep(args.sweep)
    print(_show(analysis))

    info = resolve_sweep(args.sweep)
    print(f"\nanalysis: {info.folder / ANALYSIS_DIR} (and on parent run {info.parent_run_id} under {ANALYSIS_DIR}/)")
    return 0

