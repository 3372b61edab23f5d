"""Edge-of-range warnings in the report: a family's best value of a searched parameter at the edge of its range.

    warnings = load_edge_warnings(client, info)     # edge_warnings.json of the sweep's parent run, or []
    edge_section(warnings)                           # HTML: the messages and a table with the suggested ranges

The sweep (and `carclf analyze`) writes the artifact; the report only shows it. Each warning is a dict
with family, param, best, low, high, log, edge ('lower' or 'upper'), suggested {low, high} and message.
"""

from __future__ import annotations

import html
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException

from carclf.report.render import _html_table
from carclf.report.selection import SweepInfo

log = logging.getLogger(__name__)

EDGE_ARTIFACT = "edge_warnings.json"  # on the sweep's parent run


def load_edge_warnings(client, info: SweepInfo) -> list[dict[str, Any]]:
    """The parent run's edge warnings; [] when it has none. An unreadable file is logged and skipped."""

    with tempfile.TemporaryDirectory() as tmp:
        try:
            names = {Path(f.path).name for f in client.list_artifacts(info.parent_run_id)}
            if EDGE_ARTIFACT not in names:
                return []
            raw = Path(client.download_artifacts(info.parent_run_id, EDGE_ARTIFACT, tmp)).read_text(encoding="utf-8")
            data = json.loads(raw)
        except (MlflowException, OSError, ValueError) as e:
            log.warning("sweep %s: cannot read %s of its parent run: %s", info.name, EDGE_ARTIFACT, e)
            return []
    if not isinstance(data, list):
        log.warning("sweep %s: %s is not a list of warnings; ignored", info.name, EDGE_ARTIFACT)
        return []
    return [w for w in data if isinstance(w, dict) and w.get("message")]


def edge_lines(warnings: list[dict[str, Any]]) -> list[str]:
    """The warnings' messages, one line each (the console and the summary)."""
    return [str(w["message"]) for w in warnings]


def edge_table(warnings: list[dict[str, Any]]) -> pd.DataFrame:
    """family, param, best, range, edge, suggested range: one row per warning."""
    rows = []
    for w in warnings:
        suggested = w.get("suggested") or {}
        rows.append({"family": w.get("family", ""), "param": w.get("param", ""), "best": w.get("best"),
                     "range": _range(w.get("low"), w.get("high"), w.get("log")), "edge": w.get("edge", ""),
                     "suggested range": _range(suggested.get("low"), suggested.get("high"), w.get("log"))})
    return pd.DataFrame(rows, columns=["family", "param", "best", "range", "edge", "suggested range"])


def _range(low: Any, high: Any, log_scale: Any) -> str:
    if low is None or high is None:
        return ""
    return f"{_num(low)} to {_num(high)}{' (log)' if log_scale else ''}"


def _num(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def edge_section(warnings: list[dict[str, Any]]) -> str:
    """The report's section on search ranges whose best value sits at an edge ('' without warnings)."""

    if not warnings:
        return ""
    e = html.escape
    items = "".join(f"<li>{e(m)}</li>" for m in edge_lines(warnings))
    return ("<h2 class='warn'>Search ranges to widen</h2><p class='note'>The best value the sweep found for these "
            "parameters lies at the edge of the searched range: a better value may lie beyond it. Run the sweep "
            f"again with the suggested range.</p><ul>{items}</ul>" + _html_table(edge_table(warnings)))
