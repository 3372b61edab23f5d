"""The MLflow layer: tracking URI, experiments, runs, and logging configs, figures, tables and models.

    with start_run(experiment="carclf", run_name="svm-rbf") as run:
        log_config(cfg)
        log_json({"counts": [[3, 1], [0, 4]]}, "confusion_val.json")

Everything here uses absolute URIs and locations, because Ray runs each trial in
its own working directory and a relative `sqlite:///mlflow.db` would land there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import urlencode

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

from carclf import shipped
from carclf.core import paths
from carclf.core.errors import TrackingError
from carclf.core.files import exclusive_lock
from carclf.core.redact import redact, strip_credentials
from carclf.tracking.browse import WORKFLOW_PARAM, experiment_tags, known_sweeps
from carclf.tracking.server import TrackingServer, free_port, port_in_use

if TYPE_CHECKING:  # a RunConfig is only read here: `carclf ui` starts without the model registry
    from carclf.config import RunConfig

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
        check_sqlite_store(uri[len(SQLITE_PREFIX):])
    elif uri.startswith(("http://", "https://")):
        _check_server(uri)
    elif uri.split(":", 1)[0].split("+", 1)[0] in _DATABASE_DRIVERS:
        _check_database_driver(uri)
    return uri


def check_sqlite_store(db: str) -> None:
    """An existing sqlite store that SQLite cannot read (its first page overwritten, not a database at all):
    TrackingError naming the file, instead of an SQLAlchemy traceback from the first MLflow call."""

    if not db or db == ":memory:" or not os.path.isfile(db):
        return  # a new store: MLflow creates it
    try:
        with contextlib.closing(sqlite3.connect(f"{Path(db).resolve().as_uri()}?mode=ro", uri=True,
                                                timeout=30)) as con:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()  # reads the schema page
    except sqlite3.OperationalError:
        return  # locked or not openable here: not damage; MLflow says what it is
    except sqlite3.DatabaseError as e:
        raise TrackingError(f"tracking store {db} is not a readable SQLite database ({e}); restore it from a backup, "
                            "or move it aside to start a new store (its runs are then not seen)") from None


# The packages that install each database driver SQLAlchemy may pick (by its driver name), and carclf's extra.
_DATABASE_DRIVERS = {"postgresql": "postgres", "mysql": None, "mssql": None}
_DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "pymysql": "PyMySQL",
                    "mysqldb": "mysqlclient", "pyodbc": "pyodbc", "pg8000": "pg8000", "asyncpg": "asyncpg"}


def _check_database_driver(uri: str) -> None:
    """A database URI whose driver (as SQLAlchemy picks it) is not installed: TrackingError naming what to install,
    before anything starts (MLflow would fail later, with a traceback, in every command)."""
    # heavy: SQLAlchemy loads when a database URI is checked, so `carclf ui` on sqlite starts without it
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        dialect = make_url(uri).get_dialect()
        dialect.import_dbapi()
    except ImportError as e:
        driver = getattr(dialect, "driver", e.name)
        package = _DRIVER_PACKAGES.get(driver, e.name)
        extra = _DATABASE_DRIVERS[uri.split(":", 1)[0].split("+", 1)[0]]
        how = f"pip install 'carclf[{extra}]' (or {package!r})" if extra and driver == "psycopg" else \
            f"pip install {package!r}"
        raise TrackingError(f"tracking URI {redact(uri)} needs the database driver {driver!r}, which is not installed "
                            f"(No module named {e.name!r}); {how}") from None
    except (ArgumentError, NoSuchModuleError, ValueError) as e:
        raise TrackingError(f"tracking URI {redact(uri)} is not a database URL SQLAlchemy understands ({e})") from None


def _check_server(uri: str) -> None:
    if uri in _reachable:
        return
    url = strip_credentials(uri).rstrip("/") + "/health"  # /health needs no login, also behind basic auth
    try:
        with urllib.request.urlopen(url, timeout=_HTTP_CHECK_TIMEOUT_S) as resp:
            resp.read(64)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(f"MLflow tracking server {redact(uri)} is unreachable ({redact(reason)}); "
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


def ensure_experiment(name: str, uri: str | None = None, *, created_by: str = "carclf") -> str:
    """The id of experiment `name`, creating it (with an absolute artifact location) on first use.

    A new experiment is tagged as a model-training one, with the carclf version and `created_by`.
    """
    uri = resolve_tracking_uri(uri)
    key = (uri, name)
    if key in _experiment_ids:
        return _experiment_ids[key]

    db = sqlite_path(uri)
    # A new sqlite store is created and migrated by the first access: two processes doing it at once (two sweeps
    # started together) collide in MLflow's migrations, so the first access is taken one process at a time.
    guard = exclusive_lock(f"{db}-init.lock") if db is not None and db.parent.is_dir() else contextlib.nullcontext()
    try:
        with guard:
            client = MlflowClient(tracking_uri=uri)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                exp_id = _create_experiment(client, name, default_artifact_location(uri, name), created_by)
        if exp is not None and exp.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} at {redact(uri)} is deleted; restore it or pick "
                                "another name")
        if exp is not None:
            exp_id = exp.experiment_id
    except MlflowException as e:
        raise TrackingError(f"cannot reach MLflow experiment {name!r} at {redact(uri)}: {redact(e.message)}") from None
    _experiment_ids[key] = exp_id
    return exp_id


def _create_experiment(client: MlflowClient, name: str, artifact_location: str | None,
                       created_by: str = "carclf") -> str:
    try:
        return client.create_experiment(name, artifact_location=artifact_location, tags=experiment_tags(created_by))
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
    text = redact(f"{type(error).__name__}: {error}")[:_MAX_TAG_CHARS]
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
    mlflow.log_params(param_texts(params))


def param_texts(params: dict[str, Any]) -> dict[str, str]:
    """Params as MLflow stores them (what `run.data.params` gives back)."""
    return {k: str(v)[:6000] for k, v in params.items()}


def config_params(cfg: RunConfig) -> dict[str, Any]:
    """The flattened config (`train.lr`, ...) as logged, credentials redacted."""
    return {k: redact(v) if isinstance(v, str) else v for k, v in flatten(cfg.to_dict()).items()}


def log_config(cfg: RunConfig) -> None:
    """Flattened config as params (`train.lr`, ...) and the whole resolved config as `config.yaml`.

    Credentials (a password in `tracking.uri`, say) are redacted: params and artifacts are readable by
    everyone with access to the tracking server.
    """
    log_params(config_params(cfg))
    mlflow.log_text(redact(cfg.to_yaml()), "config.yaml")


def set_tags(tags: dict[str, Any]) -> None:
    """Tags of the active run, as strings."""
    if tags:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})


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
    # (it loads the saved model in a subprocess). A local build label (torch's "+cpu") is not on PyPI.

    reqs = []
    for pkg in packages:
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


# What the shipped inference module (carclf/shipped/car_classifier.py) imports; the SVM adds its own two.
_MODEL_PACKAGES = ("torch", "torchvision", "numpy", "pandas", "pillow")
_SVM_PACKAGES = ("scikit-learn", "skops")


def _zoo_packages(name: str) -> tuple[str, ...]:
    """A timm architecture (timm/<model>, alone or in a stack) needs timm where the model loads."""
    return ("timm",) if "timm/" in str(name) else ()


def log_network_model(model, *, input_example: list[bytes], metadata: dict[str, Any]):
    """Log a trained carclf network as `model`: one pyfunc model from photo bytes to class names.

    `metadata` needs `classes`, `input_config` and `model` (the architecture's name); the weights
    are saved as a state_dict. See `_log_classifier` for what the model holds.
    """
    from carclf.shipped import car_classifier  # heavy: the classifier brings torch; `carclf ui` starts without it

    spec = {"version": car_classifier.SPEC_VERSION, "kind": "network", "classes": list(metadata["classes"]),
            "input_config": _jsonable(metadata["input_config"]), "architecture": metadata["model"],
            "kwargs": _jsonable(getattr(model, "build_kwargs", {}))}
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {"spec": _write_spec(spec, tmp), "weights": _save_state_dict(model, tmp)}
        return _log_classifier(artifacts, input_example, metadata, _MODEL_PACKAGES + _zoo_packages(metadata["model"]))


def log_svm_model(pipeline, backbone, *, input_example: list[bytes], metadata: dict[str, Any]):
    """Log a fitted SVM Pipeline and the feature backbone it was trained on as `model`: one pyfunc
    model from photo bytes to class names.

    `metadata` needs `classes`, `input_config`, `backbone` and `features`. The pipeline is saved
    with skops; a type outside the inference module's trusted list is refused here, at logging,
    rather than when someone loads the model.
    """
    import skops.io  # heavy: loaded to log an SVM, so `carclf ui` starts without it

    from carclf.shipped import car_classifier  # heavy: the classifier brings torch; `carclf ui` starts without it

    untrusted = sorted(set(skops.io.get_untrusted_types(data=skops.io.dumps(pipeline)))
                       - set(car_classifier.SVM_TRUSTED_TYPES))
    if untrusted:
        raise TrackingError(f"the SVM pipeline holds types the model loader does not trust: {', '.join(untrusted)}; "
                            "add them to SVM_TRUSTED_TYPES in carclf/shipped/car_classifier.py if they are safe")
    spec = {"version": car_classifier.SPEC_VERSION, "kind": "svm", "classes": list(metadata["classes"]),
            "input_config": _jsonable(metadata["input_config"]), "backbone": metadata["backbone"],
            "features": metadata.get("features", "gap"),
            **({"members": metadata["members"]} if metadata.get("members") else {})}
    with tempfile.TemporaryDirectory() as tmp:
        svm_path = str(Path(tmp) / "svm.skops")
        skops.io.dump(pipeline, svm_path)
        artifacts = {"spec": _write_spec(spec, tmp), "weights": _save_state_dict(backbone, tmp), "svm": svm_path}
        return _log_classifier(artifacts, input_example, metadata,
                               _MODEL_PACKAGES + _SVM_PACKAGES + _zoo_packages(metadata["backbone"]))


def _write_spec(spec: dict, folder: str) -> str:
    path = Path(folder) / "spec.json"
    path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
    return str(path)


def _save_state_dict(module, folder: str) -> str:
    import torch  # heavy: loaded to log a network, so `carclf ui` starts without it

    # CPU and contiguous: the file loads on any host (training may leave cuda, channels_last tensors).
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    path = Path(folder) / "weights.pt"
    torch.save(state, path)
    return str(path)


def classifier_signature():
    """The signature of every carclf model: `image` bytes in; class, probability, top-k and error out."""
    from carclf.shipped import car_classifier  # heavy: the classifier brings torch; `carclf ui` starts without it


    outputs = Schema([ColSpec(DataType.string, "class", required=False),
                      ColSpec(DataType.double, "probability", required=False),
                      ColSpec(Array(DataType.string), "top_classes"),
                      ColSpec(Array(DataType.double), "top_probabilities"), ColSpec(DataType.string, "error")])
    return ModelSignature(inputs=Schema([ColSpec(DataType.binary, car_classifier.IMAGE_COLUMN)]), outputs=outputs,
                          params=ParamSchema([ParamSpec("top_k", DataType.long, car_classifier.DEFAULT_TOP_K)]))


def _log_classifier(artifacts: dict[str, str], input_example: list[bytes], metadata: dict, packages: tuple):
    """One pyfunc model from code: carclf/shipped/pyfunc_model.py as the model, carclf/shipped/car_classifier.py
    beside it.

    Nothing is pickled: MLflow runs the model file on load, and the weights and the SVM are read
    with safe loaders. MLflow loads the model once here to check the input example.
    """
    from carclf.shipped import car_classifier  # heavy: the classifier brings torch; `carclf ui` starts without it


    if not input_example:
        raise ValueError("input_example must hold at least one encoded image")
    example = (pd.DataFrame({car_classifier.IMAGE_COLUMN: list(input_example)}),
               {"top_k": car_classifier.DEFAULT_TOP_K})
    return mlflow.pyfunc.log_model(
        name="model", python_model=str(shipped.FOLDER / "pyfunc_model.py"), code_paths=[car_classifier.__file__],
        artifacts=artifacts, signature=classifier_signature(), input_example=example,
        metadata=_jsonable({**metadata, "pyfunc_format": car_classifier.SPEC_VERSION}),
        pip_requirements=_pip_requirements(*packages))


def cli_ui(args) -> int:
    """`carclf ui`: the MLflow UI on the project's database, bound to 127.0.0.1, until Ctrl+C.

    The port is checked before anything starts; the links are printed once the server answers. The
    server is carclf's `TrackingServer`: one web worker and no job runner (MLflow's GenAI jobs), its
    own output kept off the console unless it fails. The store reaches it through
    MLFLOW_BACKEND_STORE_URI rather than its command line, which every user of the machine can read.
    """

    uri = resolve_tracking_uri(args.backend_store_uri)
    if port_in_use("127.0.0.1", args.port):
        raise TrackingError(f"port {args.port} is in use; try --port {free_port()} (or stop what listens there)")
    print(f"starting the MLflow UI for {redact(uri)} on 127.0.0.1:{args.port} ...", flush=True)
    server = TrackingServer(uri, port=args.port)
    try:
        with server:
            # the model-training workflow: MLflow 3.17's UI opens in its GenAI one otherwise
            print(f"MLflow UI: {server.url}/#/experiments?{urlencode(WORKFLOW_PARAM)}  (Ctrl+C stops it)")
            for line in known_sweeps(uri, server.url):
                print(f"  sweep {line}")
            sys.stdout.flush()
            while server.running:
                time.sleep(1)
            tail = server._output_tail()
    except KeyboardInterrupt:
        return 0
    raise TrackingError(f"the MLflow UI server exited:\n{tail}")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict to dotted keys: {'train': {'lr': 1}} -> {'train.lr': 1}; lists become JSON."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out
