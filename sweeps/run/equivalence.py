"""Trials a sweep need not train: an SVM configuration that gives the same model as a finished sibling trial.

    row = equivalent_trial(ctx, cfg, "svm_rbf", tags)   # None: train it; else its run is recorded, report `row`

Two cases, among the finished trial runs of the same family under the same parent run:

- identical: every setting equal (Optuna may propose a configuration of categorical choices again);
- saturated: every setting but C equal, and the earlier run is tagged `carclf.svm_saturated_at` with a
  value at or below this trial's C. Its SVMs had no support vector at the bound, so any larger C solves
  the same problem to the same optimum (carclf.models.svm explains why): the same model, the same metrics.

Such a trial is not trained. Its run (a normal trial run: this trial's config, params and tags) ends
FINISHED with the earlier run's validation metrics and artifacts, the tag `carclf.equivalent_to` = the
earlier run id, and a description saying why; Tune gets the same metrics. Only sweep trials are
skipped: `carclf train` and the report's retests always train.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

import mlflow
from mlflow.entities import ViewType

from carclf.experiment import THREADS_TAG
from carclf.models.svm import SATURATED_TAG
from carclf.tracking import runs as tracking
from carclf.tracking.runs import config_params, param_texts
from sweeps.run.records import PARENT_TAG, ROLE_TAG, _mlflow_client, _reused_row
from sweeps.search.spec import COST_METRICS

log = logging.getLogger(__name__)

EQUIVALENT_TAG = "carclf.equivalent_to"
_IGNORED = ("tracking.",)  # run name, URI, experiment: where a run is logged, not what it trains
# Metrics that describe the model (the same for an equivalent trial), besides every val_* metric and the
# sweep's cost objectives; times spent training are not copied.
_MODEL_METRICS = ("n_params", "feature_dim", "n_train_features", "svm_gamma", "epochs_run")


def _settings(params: dict) -> dict[str, str]:
    return {k: v for k, v in params.items() if not k.startswith(_IGNORED)}


def _saturated_at(run) -> float:
    try:
        return float(run.data.tags.get(SATURATED_TAG, "nan"))
    except ValueError:
        return math.nan


def match(cfg, run) -> str | None:
    """Why the finished trial run `run` trained the model that `cfg` would (None: it may not have)."""

    mine = _settings(param_texts(config_params(cfg)))
    theirs = run.data.params
    others = {k: v for k, v in mine.items() if k != "svm.C"}
    if any(theirs.get(k) != v for k, v in others.items()):
        return None
    if theirs.get("svm.C") == mine["svm.C"]:
        return "the same configuration"
    saturated_at = _saturated_at(run)
    if cfg.svm.linear_impl == "svc" and saturated_at <= cfg.svm.C:
        return (f"the same configuration but C; that run's SVMs are saturated (no support vector at its bound), "
                f"so every C >= {saturated_at:.4g} gives its model, C={cfg.svm.C:.4g} included")
    return None


def find_equivalent(client, parent_run_id: str, family: str, cfg):
    """(run, reason) of the earliest finished, trained trial run of `family` that `cfg` would repeat; else None."""

    exp_id = client.get_run(parent_run_id).info.experiment_id
    filt = (f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{ROLE_TAG}` = 'trial' "
            f"and tags.`carclf.sweep_model` = '{family}' and attributes.status = 'FINISHED'")
    runs = client.search_runs([exp_id], filter_string=filt, run_view_type=ViewType.ACTIVE_ONLY, max_results=5000,
                              order_by=["attributes.start_time ASC"])
    for run in runs:
        if EQUIVALENT_TAG in run.data.tags:
            continue  # a copy: the run it copies is in the list too
        reason = match(cfg, run)
        if reason is not None:
            return run, reason
    return None


def record_equivalent(client, cfg, earlier, reason: str, *, parent_run_id: str, tags: dict) -> str:
    """This trial's run, FINISHED without training: the earlier run's validation results under this config."""

    m = earlier.data.metrics
    metrics = {k: v for k, v in m.items() if k.startswith("val_") or k in COST_METRICS or k in _MODEL_METRICS}
    note = (f"Not trained: equivalent to trial run {earlier.info.run_id} ({reason}). Its validation metrics "
            "and artifacts are copied here.")
    run_tags = {"carclf.model": cfg.model.name, "carclf.kind": "svm", **tags, EQUIVALENT_TAG: earlier.info.run_id,
                "mlflow.note.content": note}
    if THREADS_TAG in earlier.data.tags:  # a retest of this configuration trains with the earlier run's threads
        run_tags[THREADS_TAG] = earlier.data.tags[THREADS_TAG]
    with tracking.start_run(experiment=cfg.tracking.experiment, run_name=cfg.tracking.run_name,
                            parent_run_id=parent_run_id, tags=run_tags, uri=cfg.tracking.uri) as run:
        own = tracking.config_params(cfg)
        tracking.log_params({k: v for k, v in earlier.data.params.items() if k not in own})  # data.n_train, ...
        tracking.log_config(cfg)
        tracking.log_metrics({**metrics, "train_seconds": 0.0})
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(client.download_artifacts(earlier.info.run_id, "", tmp))
            for path in sorted(root.iterdir()):
                if path.is_dir():
                    mlflow.log_artifacts(str(path), path.name)
                elif path.name != "config.yaml":  # this trial's own config is logged above
                    mlflow.log_artifact(str(path))
    return run.info.run_id


def equivalent_trial(ctx, cfg, family: str, tags: dict) -> dict | None:
    """For a sweep's SVM trial: its Tune result when an earlier trial already trained its model, else None."""

    if not cfg.is_svm:
        return None
    client = _mlflow_client(ctx.tracking_uri)
    try:
        found = find_equivalent(client, ctx.parent_run_id, family, cfg)
        if found is None:
            return None
        earlier, reason = found
        run_id = record_equivalent(client, cfg, earlier, reason, parent_run_id=ctx.parent_run_id, tags=tags)
    except Exception as e:  # noqa: BLE001 - a trial that cannot tell is trained, as it would be without this
        log.warning("could not look for an equivalent of trial %s (%s: %s); training it", tags.get("carclf.trial_id"),
                    type(e).__name__, e)
        return None
    log.info("trial %s is not trained: equivalent to run %s (%s)", tags.get("carclf.trial_id"),
             earlier.info.run_id, reason)
    row = _reused_row(client.get_run(run_id), family, ctx.spec.objective_names)
    row["equivalent"] = 1
    return row
