"""What carclf's runs look like in the MLflow UI: experiment tags, a saved view per sweep, and links.

    tags = experiment_tags("carclf sweep quickstart")     # set when carclf creates an experiment
    save_sweep_view(client, "1", "quickstart", "val_f1_macro", "max")
    print(ui_url("sqlite:////abs/mlflow.db", ui_path("1", run_id=run_id)))   # http://127.0.0.1:5000/#/...

MLflow 3.17's UI has two workflows, "GenAI" (its default: traces, evaluation runs) and "Model
training" (the runs table). Experiments carry MLflow's experiment-kind tag, and every link carclf
prints opens the model-training workflow (`workflowType=machine_learning`): the 3.17 UI picks the
workflow from that URL parameter or from the switch in its sidebar, not from the tag.

Which columns the runs table shows is kept by the UI, per browser; the shared way to set them is a
saved view (the "Views" menu above the runs table), which the UI keeps as an experiment tag
`mlflow.sharedViewState.<id>` holding {name, createdAt, updatedAt, state}. Each sweep gets one:
its trials, best first, with the model family, the selection metric and why a trial stopped early.
That tag's layout is the UI's, not a documented API: a UI that does not read it lists no view.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Sequence
from urllib.parse import urlencode

from mlflow.tracking import MlflowClient

from carclf import __version__
from carclf.core import paths
from carclf.core.redact import redact, strip_credentials

log = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"  # MLflow's value for "Machine learning" experiments
WORKFLOW_PARAM = {"workflowType": "machine_learning"}  # the 3.17 UI's model-training workflow
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
DEFAULT_UI_URL = "http://127.0.0.1:5000"  # what `carclf ui` serves by default
# Tags carclf sets on its runs and shows as runs-table columns.
FAMILY_TAG, STOPPED_TAG, BASELINE_TAG = "carclf.sweep_model", "carclf.stopped_early", "carclf.baseline"


def experiment_tags(created_by: str = "carclf") -> dict[str, str]:
    """Tags for an experiment carclf creates: model training, and what made it."""

    return {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND, "carclf.version": __version__, "carclf.created_by": created_by,
            "mlflow.note.content": "Car-model classifier runs made by carclf: one parent run per sweep with a "
                                   "child run per trial, and one 'report' run per report with its retests."}


def mark_experiment(client, experiment_id: str) -> None:
    """An experiment made before carclf tagged its kind becomes a model-training one (a kind set by hand stays).

    Never raises: how the UI shows an experiment is no reason to stop a sweep.
    """
    try:
        if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    except Exception as e:  # noqa: BLE001
        log.warning("could not tag MLflow experiment %s as model training: %s", experiment_id, e)


def ui_path(experiment_id: str, *, run_id: str | None = None, view_id: str | None = None) -> str:
    """The UI route (after the host) of an experiment's runs, one run, or a saved view."""
    route = f"/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "/runs")
    query = {**({"viewStateShareKey": view_id} if view_id else {}), **WORKFLOW_PARAM}
    return f"{route}?{urlencode(query)}"


def ui_url(tracking_uri: str, path: str) -> str:
    """The URL of a UI route for runs in `tracking_uri`: on its tracking server, else where `carclf ui` serves."""

    if tracking_uri.startswith(("http://", "https://")):
        return f"{redact(strip_credentials(tracking_uri)).rstrip('/')}{path}"
    return f"{DEFAULT_UI_URL}{path}"


def ui_heading(tracking_uri: str) -> str:
    """What to do before following ui_url's links."""
    if tracking_uri.startswith(("http://", "https://")):
        return "In the MLflow UI:"
    return "In the MLflow UI (start it with `carclf ui`):"


def view_id(sweep: str) -> str:
    """The saved view's id for a sweep: stable, so a resumed sweep updates its view (tag-key characters only)."""
    return "carclf-sweep-" + re.sub(r"[^A-Za-z0-9_.-]", "_", sweep)


def sweep_view_state(sweep: str, metric: str, mode: str, params: Sequence[str] = ()) -> dict:
    """The runs table for a sweep's trials: best first, with the family, the metric, the searched parameters
    (`params`: RunConfig fields such as 'svm.C'), the default-configuration mark and early stops."""
    metric_column = f"metrics.`{metric}`"
    tags = [f"tags.`{FAMILY_TAG}`", f"tags.`{BASELINE_TAG}`", f"tags.`{STOPPED_TAG}`"]
    columns = [tags[0], metric_column, *(f"params.`{p}`" for p in params), *tags[1:]]
    # tag columns wide enough for their names (the UI cuts a header at its default width)
    return {"searchFilter": f"tags.`carclf.sweep` = '{sweep}' and tags.`carclf.role` = 'trial'",
            "orderByKey": metric_column, "orderByAsc": mode == "min", "selectedColumns": columns,
            "columnWidths": {c: 40 + 8 * len(c) for c in tags}}


def save_sweep_view(client, experiment_id: str, sweep: str, metric: str, mode: str, params: Sequence[str] = ()) -> str:
    """Write (or update) the sweep's saved view; returns its id. Never raises: a view is a convenience."""
    vid = view_id(sweep)
    now = int(time.time() * 1000)
    envelope = {"name": f"sweep {sweep}: trials by {metric}", "createdAt": now, "updatedAt": now,
                "state": json.dumps(sweep_view_state(sweep, metric, mode, params))}
    try:
        client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + vid, json.dumps(envelope))
    except Exception as e:  # noqa: BLE001 - the sweep goes on without its view
        log.warning("could not save the MLflow UI view for sweep %r: %s", sweep, e)
    return vid


def known_sweeps(tracking_uri: str, base_url: str) -> list[str]:
    """'name: URL' of every sweep under results/ that logged to `tracking_uri` (its trials' saved view)."""

    metas = []
    for meta_path in sorted(paths.results_root().glob("*/sweep.json")):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if meta.get("tracking_uri") == tracking_uri and meta.get("parent_run_id") and meta.get("name"):
            metas.append(meta)
    out = []
    client = MlflowClient(tracking_uri) if metas else None
    for meta in metas:
        try:
            experiment_id = client.get_run(meta["parent_run_id"]).info.experiment_id
        except Exception as e:  # noqa: BLE001 - a stale sweep.json (its runs deleted) is skipped
            log.debug("skipping sweep %s: %s", meta["name"], e)
            continue
        out.append(f"{meta['name']}: {base_url}{ui_path(experiment_id, view_id=view_id(meta['name']))}")
    return out
