"""The sweep's backbone ranking in the report: each searched backbone's LogME beside its best validation figure.

    ranking = backbone_ranking(client, info, trials)   # None when the sweep ranked no backbones
    backbone_section(ranking)                           # HTML: the table and the rank correlation per family

The sweep writes `backbone_scores.json` on its parent run (sweeps.run.ranking) before its trials; the
report joins it with the trials: per family and backbone, the best finished trial's validation
figure, and Spearman's rank correlation between the scores and those figures (did the ranking
order the backbones as their trials did?). Backbones the ranking left out of the search have a
score and no trial.
"""

from __future__ import annotations

import html
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from scipy.stats import spearmanr

from carclf.report.render import _html_table
from carclf.report.selection import SweepInfo, parent_run

log = logging.getLogger(__name__)

BACKBONE_SCORES = "backbone_scores.json"  # on the sweep's parent run
BACKBONE_PARAM = "svm.backbone"


@dataclass
class BackboneRanking:
    table: pd.DataFrame  # family, backbone, logme, rank, kept, trials, best validation figure
    correlations: pd.DataFrame  # family, backbones, spearman_rho, p_value
    metric: str

    def summary(self) -> dict[str, Any]:
        return {"backbones": _records(self.table), "rank_correlation": _records(self.correlations)}


def load_backbone_scores(client, info: SweepInfo) -> dict[str, Any] | None:
    """The parent run's backbone_scores.json; None when it has none (an unreadable file is logged and skipped)."""

    with tempfile.TemporaryDirectory() as tmp:
        try:
            names = {Path(f.path).name for f in client.list_artifacts(info.parent_run_id)}
            if BACKBONE_SCORES not in names:
                return None
            local = client.download_artifacts(info.parent_run_id, BACKBONE_SCORES, tmp)
            data = json.loads(Path(local).read_text(encoding="utf-8"))
        except (MlflowException, OSError, ValueError) as e:
            log.warning("sweep %s: cannot read %s of its parent run: %s", info.name, BACKBONE_SCORES, e)
            return None
    if not isinstance(data, dict) or not isinstance(data.get("families"), list):
        log.warning("sweep %s: %s holds no list of families; ignored", info.name, BACKBONE_SCORES)
        return None
    return data


def trial_backbones(client, info: SweepInfo) -> dict[str, str]:
    """run_id -> the svm.backbone param of each of the sweep's trial runs that has one."""
    experiment_id = parent_run(client, info).info.experiment_id
    query = f"tags.mlflow.parentRunId = '{info.parent_run_id}' and tags.`carclf.role` = 'trial'"
    runs = client.search_runs([experiment_id], filter_string=query, max_results=50000)
    return {r.info.run_id: r.data.params[BACKBONE_PARAM] for r in runs if BACKBONE_PARAM in r.data.params}


def backbone_table(scores: dict[str, Any], trials: pd.DataFrame, backbones: dict[str, str], metric: str,
                   mode: str) -> pd.DataFrame:
    """One row per family and scored backbone: its LogME and rank, whether it was searched, its trials' best figure."""
    done = trials[(trials["status"] == "FINISHED")] if len(trials) else trials
    rows = []
    for family in scores["families"]:
        kept = set(map(str, family.get("kept", [])))
        for rank, s in enumerate(family.get("scores", []), 1):
            name = str(s["backbone"])
            mine = done[(done["model"] == family["family"]) & (done["run_id"].map(backbones) == name)] \
                if len(done) else done
            values = mine[metric].dropna() if metric in mine.columns else pd.Series(dtype=float)
            best = (values.max() if mode == "max" else values.min()) if len(values) else float("nan")
            rows.append({"family": family["family"], "backbone": name, "logme": float(s["logme"]), "rank": rank,
                         "searched": name in kept, "trials": int(len(mine)), f"best {metric}": float(best)})
    return pd.DataFrame(rows, columns=["family", "backbone", "logme", "rank", "searched", "trials", f"best {metric}"])


def rank_correlations(table: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """Per family, Spearman's rho between LogME and the best validation figure (backbones with trials; 3 or more)."""

    rows = []
    column = f"best {metric}"
    for family, part in table.groupby("family", sort=True):
        tried = part[part[column].notna()]
        if len(tried) < 3:
            continue
        figure = tried[column] if mode == "max" else -tried[column]  # rho > 0: better score, better figure
        rho, p = spearmanr(tried["logme"], figure)
        rows.append({"family": family, "backbones": len(tried), "spearman_rho": float(rho), "p_value": float(p)})
    return pd.DataFrame(rows, columns=["family", "backbones", "spearman_rho", "p_value"])


def backbone_ranking(client, info: SweepInfo, trials: pd.DataFrame) -> BackboneRanking | None:
    """The report's view of the sweep's backbone ranking, or None when the sweep ranked none."""
    scores = load_backbone_scores(client, info)
    if scores is None:
        return None
    table = backbone_table(scores, trials, trial_backbones(client, info), info.metric, info.mode)
    return BackboneRanking(table, rank_correlations(table, info.metric, info.mode), info.metric)


def correlation_sentence(row: pd.Series) -> str:
    return (f"{row['family']}: Spearman's rho {row['spearman_rho']:.2f} between LogME and the best validation figure "
            f"over {row['backbones']} backbones (p = {row['p_value']:.2g})")


def backbone_section(ranking: BackboneRanking | None) -> str:
    """The report's section on the backbones ranked before the search ('' when there was no ranking)."""

    if ranking is None or ranking.table.empty:
        return ""
    items = "".join(f"<li>{html.escape(correlation_sentence(r))}</li>" for _, r in ranking.correlations.iterrows())
    fewer = "" if items else ("<p class='note'>A rank correlation needs three or more backbones with a finished "
                              "trial in one family.</p>")
    return ("<h2>Backbones ranked before the search</h2><p class='note'>LogME (You et al., ICML 2021) of each "
            "searched backbone's train features, computed before the trials; higher should transfer better. "
            f"Beside it, the best {html.escape(ranking.metric)} of the backbone's finished trials. A backbone not "
            f"searched was left out by <code>rank_backbones.keep</code>.</p>{_html_table(ranking.table)}"
            f"{'<ul>' + items + '</ul>' if items else fewer}")


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-able dicts, NaN as None."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in frame.to_dict(orient="records")]
