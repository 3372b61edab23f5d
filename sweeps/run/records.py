"""What a trial leaves in MLflow and what Tune gets back: the tags a sweep writes and searches its runs by,
a client for the sweep's store, and a result (or a finished run) as Tune's row.
"""

from __future__ import annotations

from typing import Any

from mlflow.tracking import MlflowClient

from sweeps.search.spec import COST_METRICS

ROLE_TAG, SWEEP_TAG, TRIAL_TAG, MODEL_TAG = "carclf.role", "carclf.sweep", "carclf.trial_id", "carclf.model"
PARENT_TAG = "mlflow.parentRunId"
STOPPED_TAG = "carclf.stopped_early"
ERROR_TAG = "carclf.error"
PARAMS_TAG = "carclf.params_key"  # a digest of the trial's sampled parameters: finds its result again on --resume
ADOPTED_TAG = "carclf.adopted_from"
ORPHAN_TAG = "carclf.orphan"  # a finished run whose trial Tune lost (see sweeps.run.results._reconcile)
BASELINE_TAG = "carclf.baseline"  # "true" on the run of a family's default configuration (sweeps.search.defaults)


def _metric_row(row: dict, label: str, objectives=()) -> dict:
    """Tune's view of a result: its numbers, and every objective (NaN where this result has no value yet).

    Tune refuses a result without each metric the searcher optimises; a network's epochs carry no model
    size, and a trial whose last result holds a NaN objective is not counted as evaluated.
    """
    out: dict[str, Any] = {"model": label}
    for k, v in row.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
    for name in objectives:
        out.setdefault(name, float("nan"))
    return out


def _mlflow_client(uri: str):
    return MlflowClient(uri)


def _reused_row(run, label: str, objectives) -> dict:
    m = run.data.metrics
    metrics = {k: v for k, v in m.items() if k.startswith(("val_", "test_")) or k in COST_METRICS}
    row = _metric_row(metrics, label, objectives)
    row.update(epoch=int(m.get("epochs_run", 1)), mlflow_run_id=run.info.run_id, reused=1)
    return row
