"""Choose what to retest: the sweep's trial runs, and the best finished one per model family by validation.

    info = resolve_sweep("quickstart")                  # results/quickstart/sweep.json
    client = sweep_client(info)
    best = select_best(trial_runs(client, info), info.metric, info.mode)   # one row per family

A family is the sweep's model entry (`svm_linear` and `svm_rbf` are two families of the model
`svm`). Selection reads validation figures only: a test metric is refused. A trial retried after
a failure counts once, with its best attempt.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from carclf.config import RunConfig, read_yaml, set_dotted, validate_run_config
from carclf.core import paths
from carclf.core.errors import CarclfError, SweepError, TrackingError
from carclf.models.networks import finetune_applies
from carclf.tracking.browse import ui_heading, ui_path, ui_url, view_id
from carclf.tracking.runs import flatten, resolve_tracking_uri

log = logging.getLogger(__name__)

ROLE_TAG, SWEEP_TAG, MODEL_TAG = "carclf.role", "carclf.sweep", "carclf.model"
SWEEP_MODEL_TAG = "carclf.sweep_model"  # the sweep's model entry (svm_linear, svm_rbf: both model 'svm')
STOPPED_TAG = "carclf.stopped_early"  # set by the sweep runner on trials the scheduler stopped
BASELINE_TAG = "carclf.baseline"  # "true" on the trial of a family's default configuration (sweeps since issue 16)
# The searched settings shown as a model's "chosen configuration"; the full config is the run's config.yaml.
NETWORK_KEYS = ("model.weights", "model.finetune", "model.top_blocks", "train.optimizer", "train.lr",
                "train.weight_decay", "train.epochs", "train.batch_size", "augment.strength", "balance.mode",
                "balance.samples_per_class")
SVM_KEYS = ("svm.backbone", "svm.backbone_weights", "svm.features", "svm.kernel", "svm.C", "svm.gamma",
            "svm.gamma_factor", "augment.strength", "balance.mode", "balance.samples_per_class")


@dataclass(frozen=True)
class SweepInfo:
    """What `results/<name>/sweep.json` says about a sweep."""

    name: str
    folder: Path
    parent_run_id: str
    experiment: str
    tracking_uri: str
    metric: str
    mode: str

    @property
    def report_dir(self) -> Path:
        return self.folder / "report"


def resolve_sweep(sweep: str | Path) -> SweepInfo:
    """A sweep name (under paths.results_root()) or a results folder -> its sweep.json, validated."""
    given = Path(sweep).expanduser()
    if (given / "sweep.json").is_file():
        folder = given
    else:  # a name, under results/: one plain folder name, so it cannot point elsewhere
        try:
            folder = paths.sweep_dir(str(sweep))
        except SweepError as e:
            raise SweepError(f"no sweep {str(sweep)!r}: {given} holds no sweep.json, and {e}") from None
    meta_path = folder / "sweep.json"
    if not meta_path.is_file():
        raise SweepError(f"no sweep {str(sweep)!r}: neither {given} nor {folder} holds sweep.json; "
                         f"run `carclf sweep FILE --name NAME` first")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SweepError(f"{meta_path} is not readable JSON: {e}") from e
    missing = [k for k in ("name", "parent_run_id", "tracking_uri", "metric", "mode") if not meta.get(k)]
    if missing:
        raise SweepError(f"{meta_path} lacks {', '.join(missing)}")
    mode = str(meta["mode"]).lower()
    if mode not in ("max", "min"):
        raise SweepError(f"{meta_path}: mode must be 'max' or 'min', got {meta['mode']!r}")
    return SweepInfo(name=str(meta["name"]), folder=folder.resolve(), parent_run_id=str(meta["parent_run_id"]),
                     experiment=str(meta.get("experiment") or "carclf"), tracking_uri=str(meta["tracking_uri"]),
                     metric=str(meta["metric"]), mode=mode)


def sweep_uri(info: SweepInfo) -> str:
    return resolve_tracking_uri(info.tracking_uri)


def sweep_client(info: SweepInfo):
    uri = sweep_uri(info)
    # the registry lives in the same store; without this a client would follow mlflow's global registry URI
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def parent_run(client, info: SweepInfo):
    try:
        return client.get_run(info.parent_run_id)
    except MlflowException as e:
        raise TrackingError(f"sweep {info.name!r}: parent run {info.parent_run_id} not found at "
                            f"{info.tracking_uri}: {e.message}") from None


def trial_runs(client, info: SweepInfo) -> pd.DataFrame:
    """One row per trial of the sweep: run_id, trial_id, model, status, start_time, error, metrics.

    `model` is the sweep's model entry (tag carclf.sweep_model, e.g. svm_linear and svm_rbf are two
    families of the one `svm` model). A trial retried after a failure keeps its best attempt.
    The selection metric is the trial's final value (see final_metric), not MLflow's latest step.
    """
    experiment_id = parent_run(client, info).info.experiment_id
    query = (f"tags.mlflow.parentRunId = '{info.parent_run_id}' and tags.`{ROLE_TAG}` = 'trial'")
    runs = client.search_runs([experiment_id], filter_string=query, max_results=50000,
                              order_by=["attributes.start_time ASC"])
    rows = [_trial_row(client, r, info.metric) for r in runs]
    if not rows:
        return pd.DataFrame(columns=["run_id", "trial_id", "model", "status", "start_time", "error"])
    return _one_attempt_per_trial(pd.DataFrame(rows))


def _trial_row(client, run, metric: str) -> dict[str, Any]:
    tags = run.data.tags
    status = run.info.status
    if status == "KILLED" and STOPPED_TAG in tags:
        status = "STOPPED_EARLY"  # ended by the scheduler for a poor validation curve: expected, not an error
    row = {"run_id": run.info.run_id, "trial_id": tags.get("carclf.trial_id", run.info.run_id),
           "model": family_of(tags, run.data.params), "status": status, "start_time": run.info.start_time,
           "error": tags.get("carclf.error", ""), **run.data.metrics}
    if status == "FINISHED" and metric in run.data.metrics:
        row[metric] = final_metric(client, run.info.run_id, metric)
    return row


def family_of(tags: dict, params: dict | None = None) -> str:
    """A run's model family: the sweep's model entry if tagged, else the carclf model name."""
    return tags.get(SWEEP_MODEL_TAG) or tags.get(MODEL_TAG) or (params or {}).get("model.name", "")


def final_metric(client, run_id: str, key: str) -> float:
    """The value a run logged last for `key`.

    Runs from before per-epoch curves moved to `epoch_*` keys logged epochs under the same key at
    step=epoch and the final evaluation (the restored best epoch) at step 0 afterwards; MLflow's
    'latest' value is the highest step's, i.e. the last epoch's, not the final one.
    """
    history = client.get_metric_history(run_id, key)
    if not history:
        return float("nan")
    return float(max(history, key=lambda m: (m.timestamp, -m.step)).value)


def _one_attempt_per_trial(trials: pd.DataFrame) -> pd.DataFrame:
    rank = trials["status"].map({"FINISHED": 0, "STOPPED_EARLY": 1}).fillna(2)
    ordered = trials.assign(_rank=rank).sort_values(["_rank", "start_time"], ascending=[True, False], kind="mergesort")
    kept = ordered.drop_duplicates("trial_id").drop(columns="_rank")
    return kept.sort_values("start_time", kind="mergesort").reset_index(drop=True)


def select_best(trials: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """The best FINISHED trial per model by the validation `metric`; ties go to the earlier trial.

    Refuses a test metric: choosing on the test split would make the test figures optimistic.
    """
    if metric.startswith("test_"):
        raise SweepError(f"selection metric {metric!r} is a test figure; pick by a validation metric")
    if trials.empty or metric not in trials.columns:
        return trials.iloc[0:0].assign(**{metric: pd.Series(dtype=float)})
    done = trials[(trials["status"] == "FINISHED") & trials[metric].notna()]
    ascending = mode == "min"
    ordered = done.sort_values([metric, "start_time"], ascending=[ascending, True], kind="mergesort")
    return ordered.groupby("model", sort=True).head(1).sort_values("model").reset_index(drop=True)


def unfinished(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Trials that did not finish with a validation figure: what the report says it left out."""
    if trials.empty:
        return pd.DataFrame(columns=["trial_id", "model", "status", "error", "run_id"])
    has_metric = trials[metric].notna() if metric in trials.columns else pd.Series(False, index=trials.index)
    left = trials[(trials["status"] != "FINISHED") | ~has_metric]
    return left[["trial_id", "model", "status", "error", "run_id"]].reset_index(drop=True)


def trial_config(client, run_id: str) -> RunConfig:
    """The RunConfig a trial ran with: its config.yaml artifact, else rebuilt from its params."""

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, "config.yaml", tmp)
            return validate_run_config(read_yaml(local), f"config.yaml of run {run_id}")
        except (MlflowException, OSError, CarclfError) as e:
            log.warning("run %s: no usable config.yaml artifact (%s); rebuilding the config from params", run_id, e)
    params = client.get_run(run_id).data.params
    data: dict[str, Any] = {}
    for key, raw in params.items():
        set_dotted(data, key, param_value(raw))
    return validate_run_config(data, f"params of run {run_id}")


def param_value(raw: str) -> Any:
    """A config value from its MLflow param string (YAML scalars and lists; 'None' is None)."""

    if raw == "None":
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def configuration_keys(cfg: RunConfig) -> tuple[str, ...]:
    """The searched settings the config's family uses: no gamma for a linear SVM, no finetune for a network
    trained from scratch, no samples_per_class without balancing."""

    if cfg.is_svm:
        keys, unused = SVM_KEYS, {"svm.gamma", "svm.gamma_factor"} if cfg.svm.kernel != "rbf" else set()
    else:
        keys = NETWORK_KEYS
        unused = set() if finetune_applies(cfg.model.name, cfg.model.weights) else {"model.finetune"}
        if cfg.model.finetune != "top":
            unused.add("model.top_blocks")
    if cfg.balance.mode == "none":
        unused.add("balance.samples_per_class")
    return tuple(k for k in keys if k not in unused)


def chosen_configuration(cfg: RunConfig) -> str:
    """The searched settings of a config that its family uses, as 'key=value, ...'."""
    flat = flatten(cfg.to_dict())
    return ", ".join(f"{_LABELS.get(k, k.split('.', 1)[1])}={_fmt(flat.get(k), k)}" for k in configuration_keys(cfg))


# 'strength' and 'mode' alone do not say of what
_LABELS = {"augment.strength": "augment_strength", "balance.mode": "balance"}


def _fmt(value: Any, key: str = "") -> str:
    if value is None and key == "balance.samples_per_class":
        return "median"  # what None means there: the median class count of the train split
    if isinstance(value, float):
        return f"{value:.3g}"
    text = str(value)
    # a weights file is known by its name; the folder differs per machine and drowns the table
    return Path(text).name if ("/" in text or "\\" in text) else text


def sweep_lines(info) -> list[str]:
    """Where to look at a finished sweep in the UI: its trials (the saved view) and its parent run.
    `info`: carclf.report.SweepInfo."""

    experiment_id = sweep_client(info).get_run(info.parent_run_id).info.experiment_id
    uri = info.tracking_uri
    return [ui_heading(uri),
            f"  the trials, best first: {ui_url(uri, ui_path(experiment_id, view_id=view_id(info.name)))}",
            f"  the sweep's parent run: {ui_url(uri, ui_path(experiment_id, run_id=info.parent_run_id))}"]
