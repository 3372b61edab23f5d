"""A sweep that has finished, answered from what is stored: `carclf sweep FILE --resume` starts neither Ray nor a server.

    table = finished_table(plan)   # results/<name>/results.parquet, or None when there is something to resume

A sweep whose parent run ended FINISHED (every trial done, or its time budget spent) has nothing
left for Tune to do: resuming it would start Ray and an MLflow server only to print the same table.
An interrupted sweep (parent KILLED or RUNNING), a sweep without its results table, or a store
that cannot be read goes the usual way.
"""

from __future__ import annotations

import logging

import pandas as pd
from mlflow.tracking import MlflowClient

from sweeps.run.driver import SweepPlan, _is_running

log = logging.getLogger(__name__)


def finished_table(plan: SweepPlan):
    """The saved results table of a FINISHED sweep being resumed, its attrs set as run_sweep sets them; else None."""

    parquet = plan.out_dir / "results.parquet"
    if plan.state is None or not parquet.is_file() or _is_running(plan.out_dir):
        return None  # a running sweep: the usual path refuses it with "is running right now"
    parent = plan.state.get("parent_run_id", "")
    if _parent_status(plan.uri, parent) != "FINISHED":
        return None
    table = pd.read_parquet(parquet)
    table.attrs.update(parent_run_id=parent, status="FINISHED", out_dir=str(plan.out_dir), stored=True)
    return table


def _parent_status(uri: str, run_id: str) -> str | None:
    try:
        return MlflowClient(uri).get_run(run_id).info.status
    except Exception as e:  # noqa: BLE001 - unreadable here: resuming goes the usual way and says what is wrong
        log.debug("cannot read the sweep's parent run %s at %s: %s", run_id, uri, e)
        return None
