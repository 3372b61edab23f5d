"""The MLflow layer: tracking URI, experiments, runs, and logging configs, figures, tables and models.

    with start_run(experiment="carclf", run_name="svm-rbf") as run:
        log_config(cfg)
        log_json({"counts": [[3, 1], [0, 4]]}, "confusion_val.json")

Everything here uses absolute URIs and locations, because Ray runs each trial in
its own working directory and a relative `sqlite:///mlflow.db` would land there.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from carclf import paths
from carclf.config import RunConfig, flatten
from carclf.errors import TrackingError

log = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite:///"
ERROR_TAG = "carclf.error"
# MLflow rejects tag values over 8,000 characters; a traceback-length message is cut to fit.
_MAX_TAG_CHARS = 5000
_HTTP_CHECK_TIMEOUT_S = 3.0

# Per-process memo: the sweep runs many trials per worker, and each lookup is a database round trip.
_experiment_ids: dict[tuple[str, str], str] = {}
_reachable: set[str] = set()


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: `uri`, else MLFLOW_TRACKING_URI, else sqlite at the project root.

    A relative sqlite path is taken relative to the project root (not the working directory,
    which differs per Ray trial). An http(s) server that does not answer raises TrackingError.
    """
    uri = uri or paths.default_tracking_uri()
    if uri.startswith(SQLITE_PREFIX):
        db = uri[len(SQLITE_PREFIX):]
        if db and db != ":memory:" and not os.path.isabs(db):
            uri = SQLITE_PREFIX + str((paths.project_root() / db).resolve())
    elif uri.startswith(("http://", "https://")):
        _check_server(uri)
    return uri


def _check_server(uri: str) -> None:
    if uri in _reachable:
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=_HTTP_CHECK_TIMEOUT_S) as resp:
            resp.read(64)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason}); "
                            "start it with `carclf server` or fix tracking.uri / MLFLOW_TRACKING_URI") from None
    _reachable.add(uri)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    if uri.startswith(SQLITE_PREFIX):
        return Path(uri[len(SQLITE_PREFIX):])
    return None


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """For a local sqlite store: `<folder of the database>/mlartifacts/<experiment>` as a file URI.

    MLflow's own default is relative to the working directory, so trials started in different
    folders would scatter artifacts; servers and other stores keep their own default (None).
    """
    db = sqlite_path(uri)
    if db is None:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment) or "default"
    return (db.parent / "mlartifacts" / safe).resolve().as_uri()


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """The id of experiment `name`, creating it (with an absolute artifact location) on first use."""
    uri = resolve_tracking_uri(uri)
    key = (uri, name)
    if key in _experiment_ids:
        return _experiment_ids[key]
    client = MlflowClient(tracking_uri=uri)
    try:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            exp_id = _create_experiment(client, name, default_artifact_location(uri, name))
        elif exp.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} at {uri} is deleted; restore it or pick another name")
        else:
            exp_id = exp.experiment_id
    except MlflowException as e:
        raise TrackingError(f"cannot reach MLflow experiment {name!r} at {uri}: {e.message}") from e
    _experiment_ids[key] = exp_id
    return exp_id


def _create_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        # Another process created it between our lookup and create: use theirs.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextmanager
def start_run(*, experiment: str, run_name: str | None = None, parent_run_id: str | None = None,
              tags: dict[str, Any] | None = None, uri: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run that ends FINISHED, or FAILED with tag `carclf.error` when the block raises.

    `parent_run_id` makes it a child run (tag mlflow.parentRunId), also in a process where the
    parent is not active (a Ray trial). KeyboardInterrupt ends it KILLED.
    """
    uri = resolve_tracking_uri(uri)
    exp_id = ensure_experiment(experiment, uri)
    mlflow.set_tracking_uri(uri)
    str_tags = {k: str(v) for k, v in (tags or {}).items()}
    run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, parent_run_id=parent_run_id,
                           nested=mlflow.active_run() is not None or parent_run_id is not None, tags=str_tags)
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        raise
    except BaseException as e:
        _mark_failed(run.info.run_id, e)
        raise
    else:
        mlflow.end_run(status="FINISHED")


def _mark_failed(run_id: str, error: BaseException) -> None:
    text = f"{type(error).__name__}: {error}"[:_MAX_TAG_CHARS]
    try:
        mlflow.set_tag(ERROR_TAG, text)
    finally:
        # End this run even if it is not the innermost active one any more.
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(status="FAILED")
        else:
            MlflowClient().set_terminated(run_id, status="FAILED")


def log_params(params: dict[str, Any]) -> None:
    """Log params in one batch; None becomes 'None' and long values are cut to MLflow's limit."""
    mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})


def log_config(cfg: RunConfig) -> None:
    """Flattened config as params (`train.lr`, ...) and the whole resolved config as `config.yaml`."""
    log_params(flatten(cfg.to_dict()))
    mlflow.log_text(cfg.to_yaml(), "config.yaml")


def log_metrics(metrics: dict[str, Any], step: int | None = None) -> None:
    """Log the finite numeric values of `metrics` in one batch (NaN/None/str entries are left out)."""
    clean = {}
    for k, v in metrics.items():
        if isinstance(v, (bool, np.bool_)) or v is None:
            continue
        if isinstance(v, (int, float, np.integer, np.floating)) and np.isfinite(v):
            clean[k] = float(v)
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_figure(fig, name: str) -> None:
    """A matplotlib Figure as a PNG artifact at `name` (e.g. 'figures/confusion_val.png')."""
    mlflow.log_figure(fig, name)


def log_json(obj: Any, name: str) -> None:
    """A JSON-serialisable object as an artifact at `name` (numpy arrays are converted to lists)."""
    mlflow.log_dict(_jsonable(obj), name)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def log_artifact(path: str | Path, folder: str | None = None) -> None:
    """A local file as an artifact (under `folder`, keeping its file name)."""
    mlflow.log_artifact(str(path), artifact_path=folder)


def log_dataframe(df: pd.DataFrame, name: str) -> None:
    """A DataFrame as a `.parquet` or `.csv` artifact at `name` (the suffix picks the format)."""
    suffix = Path(name).suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ValueError(f"log_dataframe: {name!r} must end in .parquet or .csv")
    folder = str(Path(name).parent) if str(Path(name).parent) != "." else None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(name).name
        if suffix == ".parquet":
            df.to_parquet(path, index=False)
        else:
            df.to_csv(path, index=False)
        mlflow.log_artifact(str(path), artifact_path=folder)


def _pip_requirements(*packages: str) -> list[str]:
    # Pinned from the running environment; passing them skips MLflow's slow requirement inference
    # (it loads the saved model in a subprocess).
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in packages:
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def log_network_model(model, *, input_example: np.ndarray, metadata: dict[str, Any]):
    """Log a torch network as `model` in the pt2 format (torch.export: no pickle on load).

    `input_example` is a float32 batch [N,3,H,W] with N >= 2, so the exported batch dimension
    stays dynamic; the signature is a tensor spec inferred from it and the model's output.
    """
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    model = model.to("cpu").eval()
    example = np.ascontiguousarray(input_example, dtype=np.float32)
    if example.ndim != 4 or example.shape[0] < 2:
        raise ValueError(f"input_example must be a batch [N>=2,3,H,W], got shape {example.shape}")
    model = model.to(memory_format=torch.contiguous_format)
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    return mlflow.pytorch.log_model(
        model, name="model", serialization_format="pt2", signature=signature, input_example=example,
        metadata=_jsonable(metadata), pip_requirements=_pip_requirements("torch", "torchvision", "numpy"))


def log_svm_model(pipeline, *, input_example: np.ndarray, metadata: dict[str, Any]):
    """Log a fitted scikit-learn Pipeline as `model` in the skops format (no pickle on load).

    The skops allow-list is computed from the pipeline itself; it holds only scikit-learn and
    NumPy types, and MLflow checks at save time that the model loads back with it.
    """
    import mlflow.sklearn
    from mlflow.models import infer_signature

    example = np.ascontiguousarray(input_example, dtype=np.float32)
    signature = infer_signature(example, pipeline.predict(example))
    return mlflow.sklearn.log_model(
        pipeline, name="model", serialization_format="skops", skops_trusted_types=skops_trusted_types(pipeline),
        signature=signature, input_example=example, metadata=_jsonable(metadata),
        pip_requirements=_pip_requirements("scikit-learn", "skops", "numpy"))


def skops_trusted_types(obj) -> list[str]:
    """The types skops does not trust by default that `obj` contains (e.g. NumPy dtypes)."""
    import skops.io

    return skops.io.get_untrusted_types(data=skops.io.dumps(obj))


def cli_ui(args) -> int:
    """`carclf ui`: the MLflow UI on the project's database, bound to 127.0.0.1."""
    uri = resolve_tracking_uri(args.backend_store_uri)
    url = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(args.port)]
    print(f"MLflow UI for {uri}\n  {url}  (Ctrl+C to stop)", flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0
