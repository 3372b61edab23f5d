"""Run a sweep: Ray Tune with a seeded Optuna define-by-run space and ASHA, every trial a child run in MLflow.

    carclf sweep sweeps/quickstart.yaml              # results/quickstart/{results.csv,parquet}, MLflow runs
    carclf sweep sweeps/quickstart.yaml --resume     # continue after a crash or Ctrl-C

The driver validates the sweep file, resolves every path to an absolute one (trials run in their
own working directories), creates the MLflow experiment and the sweep's parent run, and, for a local
sqlite store, starts one MLflow server that all trials log through (no `database is locked`).
Each trial calls `carclf.experiment.run_experiment`, the same code as `carclf train`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from carclf import paths
from carclf.config import ConfigError, deep_merge
from carclf.errors import SweepError
from sweeps.spec import SweepSpec, describe_space, load_sweep_spec

log = logging.getLogger(__name__)

# mlflow and pandas are imported where used: trials import this module, and a trial that only
# reports to Tune should not pay for them.

ROLE_TAG, SWEEP_TAG, TRIAL_TAG, MODEL_TAG = "carclf.role", "carclf.sweep", "carclf.trial_id", "carclf.model"
PARENT_TAG = "mlflow.parentRunId"
STOPPED_TAG = "carclf.stopped_early"
ERROR_TAG = "carclf.error"
# How long a stopped trial's thread may take to close its MLflow run before Ray ends the process.
_STOP_GRACE_S = 60.0
# Parameters shown per finished trial and kept as columns of the results table, in this order.
PARAM_COLUMNS = {"kernel": "svm.kernel", "C": "svm.C", "gamma": "svm.gamma", "backbone": "svm.backbone",
                 "lr": "train.lr", "epochs": "train.epochs", "batch_size": "train.batch_size",
                 "finetune": "model.finetune", "weight_decay": "train.weight_decay",
                 "optimizer": "train.optimizer", "augment_strength": "augment.strength",
                 "samples_per_class": "balance.samples_per_class", "image_size": "data.image_size"}
_SVM_ONLY = {"kernel", "C", "gamma", "backbone"}
_NETWORK_ONLY = {"lr", "epochs", "batch_size", "finetune", "weight_decay", "optimizer"}


class TrialStopped(Exception):
    """The scheduler (ASHA) stopped this trial early; its MLflow run ends KILLED, not FAILED."""


# ---------------------------------------------------------------------- what every trial gets


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


def trial_config(ctx: TrialContext, params: dict, trial_id: str):
    cfg = ctx.spec.run_config(params)
    run_name = f"{params['model']}-{trial_id}"
    data = deep_merge(cfg.to_dict(), deep_merge(ctx.overrides, {"tracking": {"run_name": run_name}}))
    return type(cfg).model_validate(data)


def _metric_row(row: dict, label: str) -> dict:
    out: dict[str, Any] = {"model": label}
    for k, v in row.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
    return out


class _EpochReporter:
    """on_epoch for run_experiment: hands each network epoch to Tune, except the last one.

    The last epoch (and the SVM's single result) is reported after run_experiment returns, with the
    test metrics: a STOP that the scheduler gives on that report cannot cut the run's evaluation.
    """

    def __init__(self, label: str, network: bool, last_epoch: int):
        self.label, self.network, self.last_epoch = label, network, last_epoch
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
            tune.report(_metric_row(row, self.label))
        except SystemExit:
            # Ray ends a stopped trial's thread with SystemExit inside report().
            raise TrialStopped(f"stopped early by Tune after epoch {epoch}") from None


def _final_metrics(result, label: str, epochs: int) -> dict:
    metrics = {f"val_{k}": v for k, v in (result.val_metrics or {}).items()}
    metrics.update({f"test_{k}": v for k, v in (result.test_metrics or {}).items()})
    row = _metric_row(metrics, label)
    row.update(epoch=max(epochs, 1), mlflow_run_id=result.run_id or "")
    return row


def _mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _mark_stopped(client, run_id: str | None, epochs: int) -> None:
    if run_id is None:
        return
    with contextlib.suppress(Exception):
        client.delete_tag(run_id, ERROR_TAG)
    client.set_tag(run_id, STOPPED_TAG, f"by Tune (scheduler or time budget) after epoch {epochs}")
    client.set_terminated(run_id, status="KILLED")


def _trial_runs(client, experiment_id: str, parent_run_id: str, trial_id: str | None = None):
    from mlflow.entities import ViewType

    filt = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{ROLE_TAG}` = 'trial'"
    if trial_id is not None:
        filt += f" and tags.`{TRIAL_TAG}` = '{trial_id}'"
    return client.search_runs([experiment_id], filter_string=filt, run_view_type=ViewType.ACTIVE_ONLY,
                              max_results=5000)


def _reuse_finished_run(ctx: TrialContext, client, trial_id: str, label: str) -> dict | None:
    """On --resume: a trial that already finished in MLflow is reported from there, not retrained.

    Tune re-runs only trials that had not ended, so any unfinished run of this trial belongs to the
    interruption and is deleted: the redo is the trial's only run.
    """
    exp_id = client.get_run(ctx.parent_run_id).info.experiment_id
    runs = _trial_runs(client, exp_id, ctx.parent_run_id, trial_id)
    for run in runs:
        if run.info.status == "FINISHED":
            m = run.data.metrics
            metrics = {k: v for k, v in m.items() if k.startswith(("val_", "test_"))}
            row = _metric_row(metrics, label)
            row.update(epoch=int(m.get("epochs_run", 1)), mlflow_run_id=run.info.run_id, reused=1)
            return row
    for run in runs:
        # RUNNING: the driver was killed; KILLED: stopped by Ctrl-C. FAILED attempts stay as the record.
        if run.info.status in ("RUNNING", "SCHEDULED", "KILLED"):
            log.info("deleting run %s of trial %s left unfinished by the interrupted sweep", run.info.run_id, trial_id)
            client.delete_run(run.info.run_id)
    return None


def _feature_key(cfg) -> dict:
    """What an SVM trial's features depend on (a superset of the feature cache's key is safe)."""
    d = cfg.to_dict()
    svm = {k: d["svm"][k] for k in ("backbone", "backbone_weights", "features", "augment_copies")}
    return {"data": d["data"], "split": d["split"], "balance": d["balance"], "augment": d["augment"],
            "seed": d["seed"], "svm": svm}


@contextlib.contextmanager
def first_fill_lock(cache_dir: str | Path, key: dict) -> Iterator[None]:
    """Trials needing the same cache entries run one at a time until one of them has filled them.

    Without it, the first two SVM trials of a sweep, started together, both extract the same
    features. A marker file ends the waiting once a trial with this key has succeeded; flock
    is released by the OS if its holder dies.
    """
    import fcntl
    import hashlib

    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    folder = Path(cache_dir) / "sweep-locks"
    done = folder / f"{digest}.done"
    if done.exists():
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{digest}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        if done.exists():
            fcntl.flock(fh, fcntl.LOCK_UN)
            yield
            return
        yield
        done.touch()


_trial_thread: list[threading.Thread] = []


def run_trial(config: dict, ctx: TrialContext) -> None:
    """One Tune trial: a carclf run (a child of the sweep's parent run) reporting to Tune."""
    trial_id = tune.get_context().get_trial_id()
    _trial_thread[:] = [threading.current_thread()]
    label = config["model"]
    if ctx.resumed:
        done = _reuse_finished_run(ctx, _mlflow_client(ctx.tracking_uri), trial_id, label)
        if done is not None:
            tune.report(done)
            return
    cfg = trial_config(ctx, config, trial_id)
    network = ctx.spec.is_network(label)
    reporter = _EpochReporter(label, network, cfg.train.epochs if network else 1)
    tags = {SWEEP_TAG: ctx.sweep, ROLE_TAG: "trial", TRIAL_TAG: trial_id, MODEL_TAG: cfg.model.name,
            "carclf.sweep_model": label, "carclf.node_id": ray.get_runtime_context().get_node_id()}
    fn = ctx.experiment_fn
    if fn is None:
        from carclf.experiment import run_experiment as fn
    lock = (first_fill_lock(cfg.data.cache_dir, _feature_key(cfg)) if not network and cfg.data.cache_dir
            else contextlib.nullcontext())
    try:
        with lock:
            result = fn(cfg, on_epoch=reporter, parent_run_id=ctx.parent_run_id, tags=tags)
    except TrialStopped:
        _mark_stopped(_mlflow_client(ctx.tracking_uri), reporter.run_id, reporter.epochs)
        raise SystemExit(0) from None
    tune.report(_final_metrics(result, label, reporter.epochs))


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


class PerModelResources:
    """Resources of a trial from its sampled model (e.g. 0.25 GPU for an SVM, 1 for VGG16)."""

    def __init__(self, spec: SweepSpec):
        self.bundles = {key: entry.resources.as_ray() for key, entry in spec.models.items()}

    def __call__(self, config: dict):
        from ray.tune.execution.placement_groups import PlacementGroupFactory

        return PlacementGroupFactory([self.bundles[config["model"]]])


def make_trainable(ctx: TrialContext):
    def carclf_trial(config):
        run_trial(config, ctx)

    carclf_trial.__mixins__ = (FinishRunOnStop,)
    return tune.with_resources(carclf_trial, PerModelResources(ctx.spec))


class NetworkASHA(ASHAScheduler):
    """ASHA for network trials only: an SVM reports once, at the end, and never competes on a rung."""

    def __init__(self, *, network_models: set[str], **kw):
        super().__init__(**kw)
        self.network_models = set(network_models)

    def _is_network(self, trial) -> bool:
        return trial.config.get("model") in self.network_models

    def on_trial_result(self, tune_controller, trial, result):
        if not self._is_network(trial):
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        if not self._is_network(trial):
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)


# ---------------------------------------------------------------------- the driver


@dataclass
class _Driver:
    """Driver-side state the progress callback looks up by sweep name (callbacks are pickled by Ray)."""

    spec: SweepSpec
    client: Any  # MlflowClient
    parent_run_id: str
    metric: str
    mode: str
    best: float | None = None
    finished: int = 0
    failed: int = 0
    lines: list[str] = field(default_factory=list)
    trials: list = field(default_factory=list)


_DRIVERS: dict[str, _Driver] = {}


def _short_params(spec: SweepSpec, config: dict) -> str:
    label = config.get("model", "?")
    parts = []
    for name, value in config.items():
        if name.startswith(f"{label}.") and not name.endswith("_scale"):
            v = f"{value:.3g}" if isinstance(value, float) else str(value)
            parts.append(f"{name[len(label) + 1:]}={v}")
    return " ".join(parts)


class SweepProgress(tune.Callback):
    """A line per finished trial; the running best as metrics of the parent run."""

    def __init__(self, sweep: str):
        self.sweep = sweep

    def _driver(self) -> _Driver | None:
        return _DRIVERS.get(self.sweep)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finished(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finished(trial, failed=True)

    def on_experiment_end(self, trials, **info):
        d = self._driver()
        if d is not None:
            d.trials = list(trials)

    def _finished(self, trial, *, failed: bool) -> None:
        d = self._driver()
        if d is None:
            return
        result = trial.last_result or {}
        value = result.get(d.metric)
        params = _short_params(d.spec, trial.config)
        metrics: dict[str, float] = {}
        tags: dict[str, str] = {}
        if failed or value is None:
            d.failed += 1
            line = f"[{trial.trial_id}] {trial.config.get('model')} {params} -> failed"
        else:
            d.finished += 1
            if d.best is None or (value > d.best if d.mode == "max" else value < d.best):
                d.best = value
                metrics[f"best_{d.metric}"] = value
                tags = {"carclf.best_trial_id": trial.trial_id, "carclf.best_model": str(trial.config.get("model"))}
            line = f"[{trial.trial_id}] {trial.config.get('model')} {params} -> {d.metric} {value:.4f} (best {d.best:.4f})"
        d.lines.append(line)
        print(line, flush=True)
        metrics.update(trials_finished=d.finished, trials_failed=d.failed)
        self._log(d, metrics, tags)

    @staticmethod
    def _log(d: _Driver, metrics: dict, tags: dict) -> None:
        """One request per finished trial: this runs in Tune's event loop."""
        from mlflow.entities import RunTag

        try:
            d.client.log_batch(d.parent_run_id, metrics=_metrics(metrics, step=d.finished + d.failed),
                               tags=[RunTag(k, v) for k, v in tags.items()])
        except Exception as e:  # the sweep goes on even if the parent cannot be updated
            log.warning("could not log the running best to the parent run: %s", e)


def _metrics(values: dict, step: int):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items()]


# ---------------------------------------------------------------------- paths, tracking, Ray


def _absolute(path: str | Path, field_name: str, must_exist: bool) -> Path:
    """Relative paths are taken from the working directory, then from the project root."""
    p = Path(path).expanduser()
    if p.is_absolute():
        found = p
    else:
        found = next((c for c in (Path.cwd() / p, paths.project_root() / p) if c.exists()), Path.cwd() / p)
    if must_exist and not found.exists():
        raise SweepError(f"{field_name}: {path} does not exist (looked in {Path.cwd()} and {paths.project_root()})")
    return found.resolve()


def _storage(storage_path: str | None, out_dir: Path) -> str:
    """Ray's storage: URIs (s3://, gs://, ...) as given, local paths made absolute, default under results/."""
    if not storage_path:
        return str(out_dir / "ray")
    if "://" in storage_path:
        return storage_path
    return str(_absolute(storage_path, "--storage-path", False))


def _path_overrides(spec: SweepSpec, address: str | None = None) -> dict:
    """Absolute data and cache paths (and weights files) for every trial: one shared cache per sweep.

    Through a Ray client (ray://) the driver may not see the data at all: the paths must then be
    absolute as the cluster sees them, and the per-node check in sweeps.cluster tests them there.
    """
    data = spec.base.get("data", {})
    if address and address.startswith("ray://"):
        for key in ("path", "cache_dir"):
            if not Path(str(data.get(key, ""))).is_absolute():
                raise SweepError(f"base.data.{key} must be an absolute path readable on every node when the "
                                 f"sweep runs through a Ray client ({address}); got {data.get(key)!r}")
        return {"data": {"path": str(data["path"]), "cache_dir": str(data["cache_dir"])}}
    cache = _absolute(data["cache_dir"], "base.data.cache_dir", False) if data.get("cache_dir") else paths.cache_root()
    return {"data": {"path": str(_absolute(data.get("path", "demo_data"), "base.data.path", True)),
                     "cache_dir": str(cache)}}


def _resolve_weights_paths(spec: SweepSpec) -> SweepSpec:
    """Weights given as files become absolute in base and in every model's config."""
    def fix(d: dict, where: str) -> dict:
        d = json.loads(json.dumps(d))
        for section, name in (("model", "weights"), ("svm", "backbone_weights")):
            value = d.get(section, {}).get(name)
            if value and value not in ("imagenet", "none"):
                d[section][name] = str(_absolute(value, f"{where}.{section}.{name}", True))
        return d

    models = {k: e.model_copy(update={"config": fix(e.config, f"models.{k}.config")}) for k, e in spec.models.items()}
    return spec.model_copy(update={"base": fix(spec.base, "base"), "models": models})


def warm_decode_cache(spec: SweepSpec, overrides: dict) -> None:
    """Decode every image once, on the driver, at each image size the sweep uses.

    Otherwise the first trials, started together, would all decode the same images.
    """
    from carclf.config import validate_run_config
    from carclf.data import decode_cache_for, scan_folder

    data = overrides["data"]
    sizes = sorted({validate_run_config(spec.base_config(k)).data.image_size for k in spec.models})
    for size in sizes:
        print(f"decode cache: {data['path']} at {size} px -> {data['cache_dir']}", flush=True)
        scan_folder(data["path"], cache=decode_cache_for(data["cache_dir"], size), progress=True)


def _tracking_uri(spec: SweepSpec, tracking_uri: str | None) -> str:
    from carclf.tracking import resolve_tracking_uri

    return resolve_tracking_uri(tracking_uri or spec.base.get("tracking", {}).get("uri"))


def _weights_files(spec: SweepSpec) -> list[str]:
    files = set()
    for key in spec.models:
        cfg = spec.base_config(key)
        for section, name in (("model", "weights"), ("svm", "backbone_weights")):
            value = cfg.get(section, {}).get(name)
            if value and value not in ("imagenet", "none"):
                files.add(str(value))
    return sorted(files)


def _cluster_settings(address: str | None, uri: str, storage: str, spec: SweepSpec,
                      overrides: dict) -> tuple[str, str]:
    """On a cluster (--address), what every node can reach; checked by sweeps.cluster when present."""
    if address is None:
        return uri, storage
    try:
        from sweeps.cluster import resolve_cluster_settings
    except ImportError:
        log.warning("sweeps.cluster is not available: using tracking %s and storage %s unchecked", uri, storage)
        return uri, storage
    return resolve_cluster_settings(address, uri, storage, data_path=overrides["data"]["path"],
                                    cache_dir=overrides["data"]["cache_dir"], files=_weights_files(spec))


def _wants_server(spec: SweepSpec, uri: str) -> bool:
    if not uri.startswith("sqlite:///") or spec.tracking_server == "never":
        return False
    return True  # trials are separate processes (and the driver writes too): one writer in front of sqlite


@contextlib.contextmanager
def _tracking_endpoint(spec: SweepSpec, uri: str) -> Iterator[str]:
    """The URI trials log to: a loopback MLflow server in front of a local sqlite store, else the store."""
    if not _wants_server(spec, uri):
        yield uri
        return
    from carclf.server import TrackingServer

    db = Path(uri[len("sqlite:///"):])
    with TrackingServer(uri, artifacts_destination=db.parent / "mlartifacts") as server:
        print(f"MLflow server for this sweep: {server.url} (backend {uri})", flush=True)
        yield server.url


@contextlib.contextmanager
def _ray_session(address: str | None) -> Iterator[None]:
    """Local Ray sized to this machine unless Ray is already up (tests) or an address is given."""
    if ray.is_initialized():
        yield
        return
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        kwargs["address"] = address  # an existing cluster: its own resources and dashboard settings
    else:
        kwargs.update(num_cpus=os.cpu_count() or 1, include_dashboard=False)
    ray.init(**kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------------- sweep state (results/<name>)


def _read_state(out_dir: Path) -> dict:
    f = out_dir / "sweep.json"
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SweepError(f"cannot resume: {f} is missing or unreadable ({e})") from None


def _start_parent(client, uri: str, spec: SweepSpec, name: str, experiment: str,
                  sweep_text: str) -> str:
    from carclf.tracking import ensure_experiment

    exp_id = ensure_experiment(experiment, uri)
    run = client.create_run(exp_id, run_name=name, tags={SWEEP_TAG: name, ROLE_TAG: "sweep",
                                                         "mlflow.note.content": spec.description or name})
    rid = run.info.run_id
    params = {"metric": spec.metric, "mode": spec.mode, "num_samples": spec.num_samples,
              "max_concurrent_trials": spec.max_concurrent_trials, "models": ",".join(spec.models),
              "time_budget_s": spec.time_budget_s, "max_failures": spec.max_failures,
              "seed.sampler": spec.seeds.sampler, "seed.run": spec.seeds.run,
              "scheduler": json.dumps(spec.scheduler.model_dump() if spec.scheduler else None)}
    from mlflow.entities import Param

    client.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_text(rid, sweep_text, "sweep.yaml")
    client.log_dict(rid, describe_space(spec), "search_space.json")
    return rid


def _prepare(spec_path: Path, spec: SweepSpec, name: str, out_dir: Path, resume: bool) -> tuple[str, dict | None]:
    """The sweep file's text, and on --resume the saved state (refusing a changed sweep file)."""
    text = spec_path.read_text(encoding="utf-8")
    if not resume:
        if (out_dir / "sweep.json").exists():
            raise SweepError(f"sweep {name!r} already exists in {out_dir}: continue it with --resume, "
                             f"or pick another --name")
        return text, None
    state = _read_state(out_dir)
    saved = out_dir / "sweep.yaml"
    if saved.is_file() and saved.read_text(encoding="utf-8") != text:
        raise SweepError(f"cannot resume {name!r}: {spec_path} differs from the sweep it started with ({saved}); "
                         "Ray needs the same search space to continue")
    return text, state


# ---------------------------------------------------------------------- results


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
        if col == "gamma" and cfg["svm"]["kernel"] == "linear":
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
               "status": _status(run, t.status), "attempts": len(trial_runs)}
        row.update(_param_values(spec, config))
        metrics = run.data.metrics if run is not None else {
            k: v for k, v in (t.last_result or {}).items() if k.startswith(("val_", "test_"))}
        if row["status"] not in ("completed", "stopped_early"):
            metrics = {}  # a failed attempt's partial metrics are not a result
        row.update({k: metrics[k] for k in sorted(metrics) if k.startswith(("val_", "test_"))})
        for k in ("train_seconds", "epochs_run", "best_epoch"):
            if run is not None and k in run.data.metrics:
                row[k] = run.data.metrics[k]
        row["error"] = run.data.tags.get(ERROR_TAG, "") if run is not None else ""
        row["mlflow_run_id"] = run.info.run_id if run is not None else ""
        rows.append(row)
    import pandas as pd

    table = pd.DataFrame(rows)
    if not table.empty and spec.metric in table:
        table = table.sort_values(spec.metric, ascending=spec.mode == "min", na_position="last", kind="stable")
    return table.reset_index(drop=True)


def _reconcile(client, exp_id: str, parent: str, trials: list) -> list:
    """Child runs after the sweep: stale RUNNING ones end KILLED; ones of trials Ray no longer knows
    (started just before an interrupted driver saved its state) are deleted, so each trial has one."""
    known = {t.trial_id for t in trials}
    runs = []
    for run in _trial_runs(client, exp_id, parent):
        tid = run.data.tags.get(TRIAL_TAG)
        if tid not in known:
            log.warning("deleting run %s of trial %s, unknown to the resumed sweep", run.info.run_id, tid)
            client.delete_run(run.info.run_id)
            continue
        if run.info.status in ("RUNNING", "SCHEDULED"):
            client.set_tag(run.info.run_id, ERROR_TAG, "left unfinished when its trial ended")
            client.set_terminated(run.info.run_id, status="KILLED")
            run = client.get_run(run.info.run_id)
        runs.append(run)
    return runs


def _save_results(table, out_dir: Path, client, parent: str) -> None:
    parquet, csv = out_dir / "results.parquet", out_dir / "results.csv"
    _atomic_write(parquet, lambda p: table.to_parquet(p, index=False))
    _atomic_write(csv, lambda p: table.to_csv(p, index=False))
    client.log_artifact(parent, str(csv))
    client.log_artifact(parent, str(parquet))
    counts = table["status"].value_counts() if not table.empty else {}
    client.log_batch(parent, metrics=_metrics({f"trials_{k}": int(counts.get(k, 0))
                                               for k in ("completed", "stopped_early", "failed")}, step=len(table)))


# ---------------------------------------------------------------------- the sweep


def _tuner(spec: SweepSpec, name: str, storage: str, trainable, callback, restore: bool):
    exp_path = f"{storage.rstrip('/')}/{name}"
    if restore:
        if not tune.Tuner.can_restore(exp_path):
            raise SweepError(f"cannot resume {name!r}: no Ray Tune state at {exp_path}")
        return tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # `group` (conditional spaces sampled per group) is marked experimental; it is what this space needs.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sampler_kw = {"seed": spec.seeds.sampler, "group": True, "multivariate": True}
    if spec.n_startup_trials is not None:
        sampler_kw["n_startup_trials"] = spec.n_startup_trials
    searcher = OptunaSearch(space=spec.space_fn(), metric=spec.metric, mode=spec.mode,
                            sampler=optuna.samplers.TPESampler(**sampler_kw))
    scheduler = None
    networks = {k for k in spec.models if spec.is_network(k)}
    if spec.scheduler is not None and networks:
        s = spec.scheduler
        scheduler = NetworkASHA(network_models=networks, time_attr="training_iteration", metric=spec.metric,
                                mode=spec.mode,
                                grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                                max_t=s.max_t or spec.max_epochs())
    # reuse_actors: a trial's process (torch and carclf imported) serves the next trial of the same size.
    tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=spec.num_samples,
                                  max_concurrent_trials=spec.max_concurrent_trials,
                                  time_budget_s=spec.time_budget_s, reuse_actors=True)
    reporter = tune.CLIReporter(metric_columns=[spec.metric, "training_iteration"], parameter_columns=["model"],
                                max_report_frequency=30, metric=spec.metric, mode=spec.mode, sort_by_metric=True)
    run_config = tune.RunConfig(name=name, storage_path=storage, callbacks=[callback], verbose=1,
                                progress_reporter=reporter,
                                failure_config=tune.FailureConfig(max_failures=spec.max_failures))
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Environment variables for the driver while Tune runs, restored afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _interrupted(spec: SweepSpec, trials: list, fit_seconds: float) -> bool:
    """Ctrl-C ends Tuner.fit() normally: a sweep short of trials within its time budget was interrupted."""
    if any(t.status not in ("TERMINATED", "ERROR") for t in trials):
        return True
    budget_spent = spec.time_budget_s is not None and fit_seconds >= spec.time_budget_s
    return len(trials) < spec.num_samples and not budget_spent


def run_sweep(spec_path, *, name: str | None = None, address: str | None = None, resume: bool = False,
              storage_path: str | None = None, tracking_uri: str | None = None,
              experiment_fn: Callable | None = None):
    """Run (or with resume=True continue) a sweep; returns the results table, also saved under results/<name>/."""
    spec_path = Path(spec_path)
    spec = _resolve_weights_paths(load_sweep_spec(spec_path))
    name = name or spec.name or spec_path.stem
    out_dir = paths.results_root() / name
    text, state = _prepare(spec_path, spec, name, out_dir, resume)
    overrides = _path_overrides(spec, address)
    uri = state["tracking_uri"] if state else _tracking_uri(spec, tracking_uri)
    storage = state["storage_path"] if state else _storage(storage_path, out_dir)
    uri, storage = _cluster_settings(address, uri, storage, spec, overrides)
    experiment = state["experiment"] if state else spec.base.get("tracking", {}).get("experiment", "carclf")
    from carclf.tracking import ensure_experiment

    ensure_experiment(experiment, uri)  # database and experiment created once, here, before any trial
    if spec.warm_cache and not (address or "").startswith("ray://"):  # a Ray client may not see the data
        warm_decode_cache(spec, overrides)
    timings: dict[str, float] = {"start": time.perf_counter()}
    with _tracking_endpoint(spec, uri) as trial_uri:
        client = _mlflow_client(trial_uri)
        if state:
            parent = state["parent_run_id"]
            client.update_run(parent, status="RUNNING")
        else:
            parent = _start_parent(client, trial_uri, spec, name, experiment, text)
            _write_text(out_dir / "sweep.yaml", text)
            _write_text(out_dir / "sweep.json", json.dumps(
                {"name": name, "parent_run_id": parent, "experiment": experiment, "tracking_uri": uri,
                 "storage_path": storage, "metric": spec.metric, "mode": spec.mode}, indent=2) + "\n")
        overrides["tracking"] = {"uri": trial_uri, "experiment": experiment}
        ctx = TrialContext(sweep=name, spec=spec, overrides=overrides, parent_run_id=parent, tracking_uri=trial_uri,
                           resumed=bool(state), experiment_fn=experiment_fn)
        driver = _Driver(spec=spec, client=client, parent_run_id=parent, metric=spec.metric, mode=spec.mode)
        if state:  # the running best goes on from where the interrupted sweep left it
            m = client.get_run(parent).data.metrics
            driver.best = m.get(f"best_{spec.metric}")
        _DRIVERS[name] = driver
        status = "FAILED"
        try:
            with _ray_session(address):
                tuner = _tuner(spec, name, storage, make_trainable(ctx), SweepProgress(name), restore=bool(state))
                timings["fit_start"] = time.perf_counter()
                # The compact status table (legacy reporter) instead of a config and result table per trial.
                # Tune saves its state every 10 s or more by default; a killed driver then loses finished
                # trials that --resume has to redo.
                with _env(RAY_AIR_NEW_OUTPUT="0",
                          TUNE_GLOBAL_CHECKPOINT_S=os.environ.get("TUNE_GLOBAL_CHECKPOINT_S", "3")):
                    tuner.fit()
                timings["fit_end"] = time.perf_counter()
            exp_id = client.get_run(parent).info.experiment_id
            runs = _reconcile(client, exp_id, parent, driver.trials)
            table = results_table(spec, driver.trials, runs)
            _save_results(table, out_dir, client, parent)
            if _interrupted(spec, driver.trials, timings["fit_end"] - timings["fit_start"]):
                status = "KILLED"
                print(f"sweep {name!r} was interrupted after {len(driver.trials)} of {spec.num_samples} trials; "
                      f"continue it with: carclf sweep {spec_path} --name {name} --resume", flush=True)
            else:
                status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            _DRIVERS.pop(name, None)
            with contextlib.suppress(Exception):
                client.set_terminated(parent, status=status)
    timings["end"] = time.perf_counter()
    table.attrs["timings"] = {k: v - timings["start"] for k, v in timings.items() if k != "start"}
    table.attrs["parent_run_id"] = parent
    table.attrs["status"] = status  # FINISHED, or KILLED when interrupted (resume with --resume)
    table.attrs["out_dir"] = str(out_dir)
    return table


def _short_number(value):
    if not isinstance(value, str):
        return value
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return value


def _show(table, metric: str) -> str:
    import pandas as pd

    cols = [c for c in ("trial_id", "model", "status", *PARAM_COLUMNS, metric, metric.replace("val_", "test_"),
                        "test_accuracy") if c in table.columns and c != "image_size" and table[c].notna().any()]
    table = table.copy()
    if "gamma" in table:
        table["gamma"] = table["gamma"].map(_short_number)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4g}".format):
        return table[cols].to_string(index=False)


def cli_sweep(args) -> int:
    """`carclf sweep FILE [--name] [--address] [--resume] [--storage-path] [--tracking-uri]`."""
    table = run_sweep(args.file, name=args.name, address=args.address, resume=args.resume,
                      storage_path=args.storage_path, tracking_uri=args.tracking_uri)
    spec = load_sweep_spec(args.file)
    print()
    print(_show(table, spec.metric) if not table.empty else "no trials ran")
    out = table.attrs.get("out_dir")
    print(f"\nresults: {out}/results.csv  (parent MLflow run {table.attrs.get('parent_run_id')})")
    return 130 if table.attrs.get("status") == "KILLED" else 0
