"""One Tune trial: a carclf run, a child of the sweep's parent MLflow run, that reports to Tune.

`run_trial` is what each trial runs: it builds the trial's RunConfig from the sampled parameters,
calls `carclf.experiment.run_experiment` (the same code as `carclf train`) with the sweep's tags,
hands each network epoch to Tune, and ends a run that the scheduler stopped as KILLED. On
--resume, a trial that already finished in MLflow is reported from there instead of retrained.
The tags set here are what the results table and `carclf report` look trial runs up by.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import ray
from mlflow.entities import ViewType
from ray import tune

from carclf.config import deep_merge
from carclf.experiment import run_experiment
from carclf.models.svm import SATURATED_TAG
from carclf.training.features import augments_train_features
from sweeps.run.equivalence import equivalent_trial
from sweeps.run.records import (
    ADOPTED_TAG,
    BASELINE_TAG,
    ERROR_TAG,
    MODEL_TAG,
    ORPHAN_TAG,
    PARAMS_TAG,
    PARENT_TAG,
    ROLE_TAG,
    STOPPED_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    _metric_row,
    _mlflow_client,
    _reused_row,
)
from sweeps.search.spec import COST_METRICS, SweepSpec

log = logging.getLogger(__name__)

# mlflow and pandas are imported where used: trials import this module, and a trial that only
# reports to Tune should not pay for them.

# How long a stopped trial's thread may take to close its MLflow run before Ray ends the process.
_STOP_GRACE_S = 60.0


class TrialStopped(Exception):
    """The scheduler (ASHA) stopped this trial early; its MLflow run ends KILLED, not FAILED."""


@dataclass
class TrialContext:
    """Everything a trial needs besides its sampled parameters; resolved (absolute) on the driver."""

    sweep: str
    spec: SweepSpec
    overrides: dict  # merged into every trial's RunConfig: absolute data/cache paths, tracking
    parent_run_id: str
    tracking_uri: str  # what trials log to: the local server's URL, or the store itself
    resumed: bool = False
    experiment_fn: Callable | None = None  # default carclf.experiment.run_experiment; tests inject others
    # On --resume: finished runs of trials the saved Tune state does not know (the driver was killed
    # before Tune saved them); a resumed trial with the same parameters takes one over (see adopt_orphan).
    orphans: tuple[str, ...] = ()


def trial_config(ctx: TrialContext, params: dict, trial_id: str):
    cfg = ctx.spec.run_config(params)
    run_name = f"{params['model']}-{trial_id}"
    data = deep_merge(cfg.to_dict(), deep_merge(ctx.overrides, {"tracking": {"run_name": run_name}}))
    return type(cfg).model_validate(data)


class _EpochReporter:
    """on_epoch for run_experiment: hands each network epoch to Tune, except the last one.

    The last epoch (and the SVM's single result) is reported after run_experiment returns, with the
    final metrics: a STOP that the scheduler gives on that report cannot cut the run's logging.
    """

    def __init__(self, label: str, network: bool, last_epoch: int, objectives=()):
        self.label, self.network, self.last_epoch = label, network, last_epoch
        self.objectives = tuple(objectives)
        self.run_id: str | None = None
        self.epochs = 0

    def __call__(self, epoch: int, row: dict) -> None:
        self.epochs = epoch
        mlflow = sys.modules.get("mlflow")  # imported by whatever logs the run; not imported here
        if self.run_id is None and mlflow is not None:
            active = mlflow.active_run()
            self.run_id = active.info.run_id if active else None
        if not self.network or epoch >= self.last_epoch:
            return
        try:
            tune.report(_metric_row(row, self.label, self.objectives))
        except SystemExit:
            # Ray ends a stopped trial's thread with SystemExit inside report().
            raise TrialStopped(f"stopped early by Tune after epoch {epoch}") from None


def _final_metrics(result, label: str, epochs: int, objectives=()) -> dict:
    metrics = {f"val_{k}": v for k, v in (result.val_metrics or {}).items()}
    metrics.update({f"test_{k}": v for k, v in (result.test_metrics or {}).items()})
    # the costs a sweep may optimise besides a validation metric (sweeps.search.spec.COST_METRICS); NaN when the
    # result does not say (a stand-in experiment function)
    metrics.update({cost: getattr(result, cost, float("nan")) for cost in COST_METRICS})
    row = _metric_row(metrics, label, objectives)
    row.update(epoch=max(epochs, 1), mlflow_run_id=result.run_id or "")
    return row


def _mark_stopped(client, run_id: str | None, epochs: int) -> None:
    if run_id is None:
        return
    with contextlib.suppress(Exception):
        client.delete_tag(run_id, ERROR_TAG)
    client.set_tag(run_id, STOPPED_TAG, f"after epoch {epochs} (scheduler or time budget)")
    # MLflow shows a KILLED run as a red 'Killed'; the run's description says why in plain words
    client.set_tag(run_id, "mlflow.note.content", stopped_note(epochs))
    client.set_terminated(run_id, status="KILLED")


def stopped_note(epochs: int) -> str:
    return (f"Stopped early after epoch {epochs} by Ray Tune: the ASHA scheduler ends a trial whose validation "
            "curve trails the others at a checkpoint (or the sweep's time budget ran out). MLflow calls the run "
            "Killed; for a sweep this is a normal outcome, not an error.")


def _trial_runs(client, experiment_id: str, parent_run_id: str, trial_id: str | None = None):
    filt = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{ROLE_TAG}` = 'trial'"
    if trial_id is not None:
        filt += f" and tags.`{TRIAL_TAG}` = '{trial_id}'"
    return client.search_runs([experiment_id], filter_string=filt, run_view_type=ViewType.ACTIVE_ONLY,
                              max_results=5000)


def params_key(config: dict) -> str:
    """The same digest for the same sampled parameters, in any process."""

    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def adopt_orphan(ctx: TrialContext, client, exp_id: str, trial_id: str, config: dict):
    """A finished run with this trial's parameters, of a trial the resumed Tune state does not know: now this trial's.

    The driver was killed after that trial finished and before Tune saved it, so the resumed search
    proposes the same parameters again under a new trial id. Taking the run over keeps its result
    exactly once and trains nothing twice.
    """
    if not ctx.orphans:
        return None
    filt = (f"tags.`{PARENT_TAG}` = '{ctx.parent_run_id}' and tags.`{PARAMS_TAG}` = '{params_key(config)}' "
            f"and attributes.status = 'FINISHED'")

    for run in client.search_runs([exp_id], filter_string=filt, run_view_type=ViewType.ACTIVE_ONLY):
        if run.info.run_id in ctx.orphans and ADOPTED_TAG not in run.data.tags:
            old = run.data.tags[TRIAL_TAG]
            client.set_tag(run.info.run_id, ADOPTED_TAG, old)
            client.set_tag(run.info.run_id, TRIAL_TAG, trial_id)
            if ORPHAN_TAG in run.data.tags:
                client.delete_tag(run.info.run_id, ORPHAN_TAG)
            log.info("trial %s takes over finished run %s of trial %s (same parameters)", trial_id,
                     run.info.run_id, old)
            return client.get_run(run.info.run_id)
    return None


def close_dead_attempts(ctx: TrialContext, client, trial_id: str) -> None:
    """Runs of this trial still RUNNING when it starts belong to an attempt whose process died: they end FAILED."""
    exp_id = client.get_run(ctx.parent_run_id).info.experiment_id
    for run in _trial_runs(client, exp_id, ctx.parent_run_id, trial_id):
        if run.info.status in ("RUNNING", "SCHEDULED"):
            client.set_tag(run.info.run_id, ERROR_TAG, "the trial's process died (killed, or out of memory); "
                                                       "Tune retried the trial")
            client.set_terminated(run.info.run_id, status="FAILED")


def _reuse_finished_run(ctx: TrialContext, client, trial_id: str, label: str, config: dict | None = None) -> dict | None:
    """On --resume: a trial that already finished in MLflow is reported from there, not retrained.

    Tune re-runs only trials that had not ended, so any unfinished run of this trial belongs to the
    interruption and is deleted: the redo is the trial's only run. A trial Tune never saved comes
    back under a new id: its finished run is found by its parameters (adopt_orphan).
    """
    exp_id = client.get_run(ctx.parent_run_id).info.experiment_id
    runs = _trial_runs(client, exp_id, ctx.parent_run_id, trial_id)
    for run in runs:
        if run.info.status == "FINISHED":
            return _reused_row(run, label, ctx.spec.objective_names)
    adopted = adopt_orphan(ctx, client, exp_id, trial_id, config) if config is not None else None
    if adopted is not None:
        return _reused_row(adopted, label, ctx.spec.objective_names)
    for run in runs:
        # RUNNING: the driver was killed; KILLED: stopped by Ctrl-C. FAILED attempts stay as the record.
        if run.info.status in ("RUNNING", "SCHEDULED", "KILLED"):
            log.info("deleting run %s of trial %s left unfinished by the interrupted sweep", run.info.run_id, trial_id)
            client.delete_run(run.info.run_id)
    return None


def _feature_key(cfg) -> dict:
    """What an SVM trial's features depend on: trials with equal keys wait for the first to fill the cache.

    As in carclf.training.features.feature_key, the seed counts only where it changes the features (augmentation,
    balancing that draws rows by seed, a random-init backbone), so trials that differ only in seed share
    the features. A key coarser than the cache's costs only parallelism: the waiting ends once one has
    filled its entries.
    """

    d = cfg.to_dict()
    svm = {k: d["svm"][k] for k in ("backbone", "backbone_weights", "features", "augment_copies")}
    key = {"data": d["data"], "split": d["split"], "balance": d["balance"], "svm": svm}
    if augments_train_features(cfg):
        key.update(augment=d["augment"], seed=d["seed"])
    elif cfg.balance.mode != "none" or str(cfg.svm.backbone_weights).lower() == "none":
        key["seed"] = d["seed"]
    return key


@contextlib.contextmanager
def first_fill_lock(cache_dir: str | Path, key: dict) -> Iterator[None]:
    """Trials needing the same cache entries run one at a time until one of them has filled them.

    Without it, the first two SVM trials of a sweep, started together, both extract the same
    features. A marker file ends the waiting once a trial with this key has succeeded (or the
    driver has extracted the features before the trials: sweeps.run.prefetch); flock is released by
    the OS if its holder dies. A trial that has to wait says so in its log, and for what.
    """

    lock, done = _fill_paths(cache_dir, key)
    if done.exists():
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            start = time.perf_counter()
            log.warning("waiting for another trial to extract the features of %s (lock %s)", _what(key), lock)
            fcntl.flock(fh, fcntl.LOCK_EX)
            log.warning("waited %.0f s for the features of %s", time.perf_counter() - start, _what(key))
        if done.exists():
            fcntl.flock(fh, fcntl.LOCK_UN)
            yield
            return
        yield
        done.touch()


def mark_filled(cache_dir: str | Path, key: dict) -> None:
    """The entries of `key` are in the cache: trials with this key no longer wait for each other."""
    _, done = _fill_paths(cache_dir, key)
    done.parent.mkdir(parents=True, exist_ok=True)
    done.touch()


def _fill_paths(cache_dir: str | Path, key: dict) -> tuple[Path, Path]:
    """The lock file and the done marker of one feature key."""

    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    folder = Path(cache_dir) / "sweep-locks"
    return folder / f"{digest}.lock", folder / f"{digest}.done"


def _what(key: dict) -> str:
    """A feature key in words, for the log."""
    svm, data = key.get("svm", {}), key.get("data", {})
    return f"{svm.get('backbone')} ({svm.get('backbone_weights')}) at {data.get('image_size')} px"


_trial_thread: list[threading.Thread] = []


def run_trial(config: dict, ctx: TrialContext) -> None:
    """One Tune trial: a carclf run (a child of the sweep's parent run) reporting to Tune."""
    trial_id = tune.get_context().get_trial_id()
    _trial_thread[:] = [threading.current_thread()]
    label = config["model"]
    if ctx.resumed:
        done = _reuse_finished_run(ctx, _mlflow_client(ctx.tracking_uri), trial_id, label, config)
        if done is not None:
            tune.report(done)
            return
    else:
        close_dead_attempts(ctx, _mlflow_client(ctx.tracking_uri), trial_id)
    cfg = trial_config(ctx, config, trial_id)
    network = ctx.spec.is_network(label)
    reporter = _EpochReporter(label, network, cfg.train.epochs if network else 1, ctx.spec.objective_names)
    tags = {SWEEP_TAG: ctx.sweep, ROLE_TAG: "trial", TRIAL_TAG: trial_id, MODEL_TAG: cfg.model.name,
            "carclf.sweep_model": label, "carclf.node_id": ray.get_runtime_context().get_node_id(),
            PARAMS_TAG: params_key(config)}
    if config.get("baseline"):
        tags[BASELINE_TAG] = "true"

    same = equivalent_trial(ctx, cfg, label, tags)  # an SVM an earlier trial already trained: not trained again
    if same is not None:
        tune.report(same)
        return
    fn = ctx.experiment_fn
    if fn is None:
        fn = run_experiment
    lock = (first_fill_lock(cfg.data.cache_dir, _feature_key(cfg)) if not network and cfg.data.cache_dir
            else contextlib.nullcontext())
    try:
        with lock:
            # Lean: selection is on validation, so a trial never reads the test split and logs no model;
            # the report retests the chosen configurations on test and logs their models.
            result = fn(cfg, on_epoch=reporter, parent_run_id=ctx.parent_run_id, tags=tags, evaluate_test=False,
                        log_model=False)
    except TrialStopped:
        _mark_stopped(_mlflow_client(ctx.tracking_uri), reporter.run_id, reporter.epochs)
        raise SystemExit(0) from None
    row = _final_metrics(result, label, reporter.epochs, ctx.spec.objective_names)
    if not network:
        row.update(_saturation(ctx, result.run_id))
    tune.report(row)


def _saturation(ctx: TrialContext, run_id: str | None) -> dict:
    """{"saturated_at": C} when the trial's SVM is the same model for every C from C on (the budget's search
    then looks below it), else {}."""

    if not run_id:
        return {}
    try:
        value = _mlflow_client(ctx.tracking_uri).get_run(run_id).data.tags.get(SATURATED_TAG)
        return {} if value is None else {"saturated_at": float(value)}
    except Exception as e:  # noqa: BLE001 - the search goes on without the hint
        log.warning("could not read whether trial run %s is saturated: %s", run_id, e)
        return {}


class FinishRunOnStop:
    """Mixed into the trial's Trainable: when Tune stops a trial, wait for its thread to close the MLflow run.

    Ray ends a stopped trial by raising SystemExit in its thread and then ending the process; without
    the wait, the run could be left RUNNING forever.
    """

    def cleanup(self):
        try:
            super().cleanup()
        finally:
            for thread in list(_trial_thread):
                if thread is not threading.current_thread():
                    thread.join(timeout=_STOP_GRACE_S)
