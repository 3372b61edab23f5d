"""The results table: one row per Tune trial, reconciled with its MLflow runs, saved under results/<name>/.

    table = collect_results(spec, client, parent_run_id, trials, out_dir)   # results.parquet, results.csv

A row holds the trial's model entry, its status (completed, stopped_early, failed), the resolved
parameters that matter for its model, its val_*/test_* metrics as MLflow recorded them, and the
MLflow run that represents it (finished, else stopped early, else the latest failed attempt).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import pandas as pd
from ray.tune import ExperimentAnalysis

from carclf.core.console import cell_text, constant_values, fit_table, wrapped
from carclf.core.errors import ConfigError, SweepError
from carclf.models.networks import finetune_applies
from sweeps.run.driver import _stage
from sweeps.run.progress import _metrics
from sweeps.run.records import ERROR_TAG, ORPHAN_TAG, STOPPED_TAG, TRIAL_TAG
from sweeps.run.trial import _trial_runs
from sweeps.search.spec import SweepSpec

log = logging.getLogger(__name__)

# Parameters shown per finished trial and kept as columns of the results table, in this order.
PARAM_COLUMNS = {"kernel": "svm.kernel", "C": "svm.C", "gamma": "svm.gamma", "gamma_factor": "svm.gamma_factor",
                 "backbone": "svm.backbone",
                 "lr": "train.lr", "epochs": "train.epochs", "batch_size": "train.batch_size",
                 "finetune": "model.finetune", "weight_decay": "train.weight_decay",
                 "optimizer": "train.optimizer", "top_blocks": "model.top_blocks",
                 "augment_strength": "augment.strength",
                 "samples_per_class": "balance.samples_per_class", "image_size": "data.image_size"}
_SVM_ONLY = {"kernel", "C", "gamma", "gamma_factor", "backbone"}
_NETWORK_ONLY = {"lr", "epochs", "batch_size", "finetune", "weight_decay", "optimizer", "top_blocks"}


def _choose_run(runs: list):
    """The run that represents a trial: finished, else stopped early, else the latest failure."""
    order = {"FINISHED": 0, "KILLED": 1, "FAILED": 2}
    return min(runs, key=lambda r: (order.get(r.info.status, 3), -r.info.start_time)) if runs else None


def _status(run, tune_status: str) -> str:
    if run is None:
        return "failed" if tune_status == "ERROR" else tune_status.lower()
    if run.info.status == "FINISHED":
        return "completed"
    if run.info.status == "KILLED" and STOPPED_TAG in run.data.tags:
        return "stopped_early"
    return "failed" if run.info.status == "FAILED" else run.info.status.lower()


def _param_values(spec: SweepSpec, config: dict) -> dict:
    label = config.get("model")
    try:
        cfg = spec.run_config(config).to_dict()
    except (ConfigError, KeyError):
        return {}
    out = {}
    network = spec.is_network(label)
    for col, dotted in PARAM_COLUMNS.items():
        if (network and col in _SVM_ONLY) or (not network and col in _NETWORK_ONLY):
            continue
        if col in ("gamma", "gamma_factor") and cfg["svm"]["kernel"] != "rbf":
            continue
        if col == "finetune" and not finetune_applies(cfg["model"]["name"], cfg["model"]["weights"]):
            continue  # a network trained from scratch trains whole either way
        if col == "top_blocks" and cfg["model"]["finetune"] != "top":
            continue
        section, key = dotted.split(".")
        value = cfg[section][key]
        out[col] = str(value) if col == "gamma" else value
    return out


def results_table(spec: SweepSpec, trials: list, runs: list):
    """One row per Tune trial: model, status, resolved parameters, val_*/test_* metrics, mlflow_run_id."""
    by_trial: dict[str, list] = {}
    for run in runs:
        by_trial.setdefault(run.data.tags.get(TRIAL_TAG), []).append(run)
    rows = []
    for t in trials:
        config = dict(t.config)
        trial_runs = by_trial.get(t.trial_id, [])
        run = _choose_run(trial_runs)
        label = config.get("model")
        row = {"trial_id": t.trial_id, "model": label, "model_name": spec.model_name(label) if label else None,
               "status": _status(run, t.status), "attempts": len(trial_runs),
               "baseline": bool(config.get("baseline"))}  # the family's default configuration
        row.update(_param_values(spec, config))
        metrics = run.data.metrics if run is not None else {
            k: v for k, v in (t.last_result or {}).items() if k.startswith(("val_", "test_"))}
        if row["status"] not in ("completed", "stopped_early"):
            metrics = {}  # a failed attempt's partial metrics are not a result
        elif row["status"] == "stopped_early":
            metrics = _last_reported(metrics, t.last_result or {})
        row.update({k: metrics[k] for k in sorted(metrics) if k.startswith(("val_", "test_"))})
        for k in ("train_seconds", "epochs_run", "best_epoch"):
            if run is not None and k in run.data.metrics:
                row[k] = run.data.metrics[k]
        row["error"] = run.data.tags.get(ERROR_TAG, "") if run is not None else ""
        row["mlflow_run_id"] = run.info.run_id if run is not None else ""
        rows.append(row)

    table = pd.DataFrame(rows)
    if not table.empty and spec.metric in table:
        table = table.sort_values(spec.metric, ascending=spec.mode == "min", na_position="last", kind="stable")
    return table.reset_index(drop=True)


def _last_reported(metrics: dict, last_result: dict) -> dict:
    """A stopped trial's figures: the val_* of the last epoch it reported (MLflow's epoch_val_* of its run,
    else Tune's last result), where its run has no final val_* (it never reached its final evaluation)."""
    out = dict(metrics)
    for k, v in metrics.items():
        if k.startswith("epoch_val_"):
            out.setdefault(k[len("epoch_"):], v)
    for k, v in last_result.items():
        if k.startswith("val_") and isinstance(v, (int, float)) and v == v:
            out.setdefault(k, v)
    return out


def _reconcile(client, exp_id: str, parent: str, trials: list) -> list:
    """Child runs after the sweep: stale RUNNING ones end KILLED; unfinished ones of trials Ray no longer
    knows (started just before an interrupted driver saved its state) are deleted, so each trial has one.

    A finished run of such a trial is kept (tagged ORPHAN_TAG): a resumed trial with its parameters
    took it over already if there was one (sweeps.run.trial.adopt_orphan), and finished work is never
    thrown away. With no trials from Tune at all nothing is deleted.
    """
    known = {t.trial_id for t in trials}
    runs = []
    for run in _trial_runs(client, exp_id, parent):
        tid = run.data.tags.get(TRIAL_TAG)
        if tid not in known:
            if run.info.status == "FINISHED":
                client.set_tag(run.info.run_id, ORPHAN_TAG, "finished, but its trial was lost when the driver "
                                                            "stopped before Ray Tune saved it")
            elif known:
                log.warning("deleting run %s of trial %s, unknown to the resumed sweep", run.info.run_id, tid)
                client.delete_run(run.info.run_id)
            continue
        if run.info.status in ("RUNNING", "SCHEDULED"):
            run = _end_killed(client, run, "left unfinished when its trial ended")
        runs.append(run)
    return runs


def _end_killed(client, run, why: str):
    client.set_tag(run.info.run_id, ERROR_TAG, why)
    client.set_terminated(run.info.run_id, status="KILLED")
    return client.get_run(run.info.run_id)


def close_unfinished_runs(client, parent: str) -> None:
    """After an interruption the driver could not wind down: no trial run stays RUNNING (--resume redoes them)."""
    try:
        exp_id = client.get_run(parent).info.experiment_id
        for run in _trial_runs(client, exp_id, parent):
            if run.info.status in ("RUNNING", "SCHEDULED"):
                _end_killed(client, run, "left unfinished when the sweep was interrupted")
    except Exception as e:  # noqa: BLE001 - best effort on the way out; --resume cleans up too
        log.warning("could not close the unfinished trial runs of %s: %s", parent, e)


def write_tables(table, out_dir: Path) -> tuple[Path, Path]:
    """results.parquet and results.csv: both are written beside their places before either is moved in, so a
    failed write (disk full, unwritable folder) raises SweepError naming the path and leaves the previous
    tables (if any) as they were, and no temporary file."""
    targets = {out_dir / "results.parquet": lambda p: table.to_parquet(p, index=False),
               out_dir / "results.csv": lambda p: table.to_csv(p, index=False)}
    staged: dict[Path, Path] = {}
    path = out_dir
    try:
        for path, write in targets.items():
            staged[path] = _stage(path, write)
        for path, tmp in staged.items():
            os.replace(tmp, path)
    except OSError as e:
        raise SweepError(f"cannot write the results table {path}: {e.strerror or e}. The trials are in MLflow; "
                         "make room (or fix the folder) and run the sweep again with --resume to write it") from None
    finally:
        for tmp in staged.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # only what was not moved in
    return tuple(targets)


def _save_results(table, out_dir: Path, client, parent: str) -> None:
    parquet, csv = write_tables(table, out_dir)
    counts = table["status"].value_counts() if not table.empty else {}
    try:
        client.log_artifact(parent, str(csv))
        client.log_artifact(parent, str(parquet))
        client.log_batch(parent, metrics=_metrics({f"trials_{k}": int(counts.get(k, 0))
                                                   for k in ("completed", "stopped_early", "failed")},
                                                  step=len(table)))
    except Exception as e:  # noqa: BLE001 - the tables are on disk; the parent run only gets copies
        log.warning("results saved in %s, but not attached to the parent run %s: %s", out_dir, parent, e)


def orphan_runs(client, parent_run_id: str, exp_path: str) -> tuple[str, ...]:
    """On --resume, before Tune starts: finished trial runs of trials the saved Tune state does not hold."""

    try:
        known = {t.trial_id for t in ExperimentAnalysis(exp_path).trials}
    except Exception as e:  # noqa: BLE001 - without the saved trials nothing can be matched; nothing is lost
        log.warning("cannot read the saved trials at %s: %s", exp_path, e)
        return ()
    exp_id = client.get_run(parent_run_id).info.experiment_id
    return tuple(r.info.run_id for r in _trial_runs(client, exp_id, parent_run_id)
                 if r.info.status == "FINISHED" and r.data.tags.get(TRIAL_TAG) not in known)


def collect_results(spec: SweepSpec, client, parent_run_id: str, trials: list, out_dir: Path):
    """After Tune: the child runs reconciled with Tune's trials, the results table built and saved."""
    exp_id = client.get_run(parent_run_id).info.experiment_id
    runs = _reconcile(client, exp_id, parent_run_id, trials)
    table = results_table(spec, trials, runs)
    _save_results(table, out_dir, client, parent_run_id)
    return table


def _short_number(value):
    if not isinstance(value, str):
        return value
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return value


def _show(table, metric: str, width: int | None = None) -> str:
    """The results table for the terminal: one `configuration` column (wrapped to fit), settings that are
    the same in every trial said once below; every column is in results.csv."""

    table = table.copy()
    if "samples_per_class" in table:  # None (missing in the table) means the median class count
        table["samples_per_class"] = table["samples_per_class"].map(lambda v: "median" if pd.isna(v) else int(v))
    params = [c for c in PARAM_COLUMNS if c in table.columns]
    same = constant_values(table, params)
    varying = [c for c in params if c not in same and table[c].notna().any()]
    shown = table[[c for c in ("trial_id", "model", "status", metric, metric.replace("val_", "test_"),
                               "test_accuracy") if c in table.columns]].copy()
    shown["configuration"] = [" ".join(f"{c}={cell_text(_short_number(row[c]))}" for c in varying
                                       if cell_text(row[c]) != "") for _, row in table.iterrows()]
    if "baseline" in table:  # the family's default configuration, the baseline of its tuning
        marked = table["baseline"].astype("boolean").fillna(False)
        shown["configuration"] = [f"(default) {c}".rstrip() if b else c for c, b in zip(shown["configuration"], marked)]
    text = fit_table(shown, width=width, wrap="configuration", optional=["test_accuracy"])
    if same:
        text += "\n" + wrapped("same in every trial that uses it: " + ", ".join(f"{c}={v}" for c, v in same.items()),
                               width)
    return text
