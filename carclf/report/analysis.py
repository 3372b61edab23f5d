"""The sweep's analysis in the report: per family, importance, history, parallel coordinates and slices;
across families, the Pareto front with the retested choices marked.

    stored = load_analysis(client, info)                  # analysis/ of the sweep's parent run, or None
    html, figures = analysis_section(stored, families, info)

The analysis itself is made by sweeps.analysis.explain (with Optuna) at the end of every sweep and by
`carclf analyze`, and kept on the sweep's parent run under `analysis/`. The report reads it from
there instead of computing it: carclf does not import Optuna, and the report shows the analysis
MLflow holds, the one `carclf analyze` refreshes for a sweep that was still running. Only the
Pareto front is drawn here, from the stored points, because the retested choices are the report's.
"""

from __future__ import annotations

import html
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException

from carclf.core.figures import pareto_front_figure
from carclf.report.render import _html_table, data_uri, figure_png
from carclf.report.retest import FamilyRetest
from carclf.report.selection import SweepInfo

log = logging.getLogger(__name__)

ANALYSIS_DIR = "analysis"  # where sweeps.analysis.explain logs it on the parent run
FIGURE_TITLES = {"importance": "Hyperparameter importance (PED-ANOVA)",
                 "history": "Optimisation history: each trial and the best so far, by trial and by wall time",
                 "parallel": "Parallel coordinates of the searched parameters, coloured by the metric",
                 "slice": "The metric against each numeric parameter"}


@dataclass
class StoredAnalysis:
    """summary.json of a sweep's analysis, with the figures (PNG bytes) and tables it names."""

    summary: dict[str, Any]
    figures: dict[str, bytes] = field(default_factory=dict)  # path under analysis/ -> PNG
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # path under analysis/ -> table


def load_analysis(client, info: SweepInfo) -> StoredAnalysis | None:
    """The analysis on the sweep's parent run, or None when there is none (or it cannot be read)."""

    with tempfile.TemporaryDirectory() as tmp:
        try:
            root = Path(client.download_artifacts(info.parent_run_id, ANALYSIS_DIR, tmp))
            summary = json.loads((root / "summary.json").read_text(encoding="utf-8"))
        except (MlflowException, OSError, ValueError) as e:
            log.info("sweep %s: no readable analysis on its parent run (%s)", info.name, e)
            return None
        stored = StoredAnalysis(summary)
        for rel in _named_files(summary):
            path = root / rel
            if not path.is_file():
                continue
            if rel.endswith(".png"):
                stored.figures[rel] = path.read_bytes()
            elif path.stat().st_size:
                stored.tables[rel] = pd.read_csv(path)
    return stored


def _named_files(summary: dict[str, Any]) -> list[str]:
    names = []
    for family in summary.get("families", {}).values():
        names += list(family.get("figures", {}).values()) + list(family.get("tables", {}).values())
    if summary.get("pareto"):
        names.append(summary["pareto"]["table"])
    return names


def pareto_figure(stored: StoredAnalysis, families: list[FamilyRetest]) -> bytes | None:
    """The Pareto front across families, each family's retested trial ringed; None without a front."""

    pareto = stored.summary.get("pareto")
    table = stored.tables.get(pareto["table"]) if pareto else None
    if table is None or table.empty:
        return None
    (y, _), (x, _) = pareto["objectives"]
    marked = [f.trial_run_id for f in families if f.runs]
    return figure_png(pareto_front_figure(table, x, y, marked=marked,
                                          title=f"{y} against {x}: every finished trial, retested choices ringed"))


def analysis_section(stored: StoredAnalysis | None, families: list[FamilyRetest],
                     info: SweepInfo) -> tuple[str, dict[str, bytes]]:
    """The report's 'How the search went' section (HTML) and the figures it adds as files ({'pareto': PNG})."""
    e = html.escape
    head = "<h2>How the search went</h2>"
    if stored is None:
        return (head + f"<p class='warn'>The sweep's parent run holds no analysis (made at the end of each sweep). "
                f"Run <code>carclf analyze {e(info.name)}</code>, then this report again.</p>", {})
    s = stored.summary
    parts = [head, f"<p class='note'>From the sweep's analysis ({e(str(s.get('created', '')))}; "
                   f"{s.get('trials', 0)} trial runs): Optuna studies rebuilt from the trials in MLflow, "
                   "importance by PED-ANOVA, one study per model family on its validation "
                   f"{e(s.get('metric', info.metric))}.</p>"]
    figures = {}
    png = pareto_figure(stored, families)
    if png is not None:
        figures["pareto"] = png
        parts.append(_pareto_html(stored, families, png))
    for key, family in s.get("families", {}).items():
        parts.append(_family_html(stored, key, family, s.get("metric", info.metric)))
    return "\n".join(parts), figures


def pareto_table(stored: StoredAnalysis, families: list[FamilyRetest]) -> pd.DataFrame:
    """The trials on the front and the retested ones: family, trial, both objectives, on_front, retested."""
    pareto = stored.summary["pareto"]
    (y, _), (x, _) = pareto["objectives"]
    table = stored.tables[pareto["table"]]
    chosen = {f.trial_run_id for f in families if f.runs}
    on_front = table["on_front"].astype(bool)
    shown = table[on_front | table["run_id"].isin(chosen)].sort_values(x, kind="stable")
    return shown[["family", "trial_id", y, x, "on_front"]].assign(retested=shown["run_id"].isin(chosen))


def _pareto_html(stored: StoredAnalysis, families: list[FamilyRetest], png: bytes) -> str:
    e = html.escape
    (y, y_mode), (x, x_mode) = stored.summary["pareto"]["objectives"]
    shown = pareto_table(stored, families)
    return (f"<h3>Pareto front: {e(y)} ({e(y_mode)}) against {e(x)} ({e(x_mode)})</h3>"
            "<p class='note'>Every finished trial of every family; the front holds the trials no other trial "
            "beats on both. Ringed: the trial each family's retest started from (chosen by the first objective). "
            "Table: the front and the retested trials.</p>"
            f"<img alt='Pareto front' src='{data_uri(png)}'>" + _html_table(shown))


def _family_html(stored: StoredAnalysis, key: str, family: dict[str, Any], metric: str) -> str:
    e = html.escape
    best = family.get("best")
    line = (f"best {e(metric)} {best['value']:.4f} (trial {e(str(best['trial_id']))})" if best
            else f"no finished trial with {e(metric)}")
    parts = [f"<h3>{e(key)}</h3><p class='note'>{family.get('trials', 0)} trials, {family.get('finished', 0)} "
             f"finished; {line}.</p>"]
    parts += [f"<p class='note'>{e(n)}</p>" for n in family.get("notes", [])]
    tables = family.get("tables", {})
    importance = stored.tables.get(tables.get("importance", ""))
    if importance is not None and not importance.empty:
        parts.append("<h4>Hyperparameter importance</h4>" + _html_table(importance))
    choices = stored.tables.get(tables.get("choices", ""))
    if choices is not None and not choices.empty:
        backbones = choices[choices["param"].astype(str).str.endswith(".backbone")]
        if len(backbones):  # sorted best first by sweeps.analysis.explain
            won = backbones.iloc[0]
            parts.append(f"<p>Backbone that won: <b>{e(str(won['choice']))}</b> (best {e(metric)} "
                         f"{float(won['best']):.4f} over {int(won['trials'])} trials)</p>")
        parts.append(f"<h4>How each choice fared, by {e(metric)}</h4>" + _html_table(choices))
    for name, path in family.get("figures", {}).items():
        if path in stored.figures:
            title = FIGURE_TITLES.get(name, name)
            parts.append(f"<h4>{e(title)}</h4><img alt='{e(key)}: {e(title)}' src='{data_uri(stored.figures[path])}'>")
    return "\n".join(parts)
