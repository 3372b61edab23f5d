"""What the driver settles before Tune starts: absolute paths, the tracking endpoint, the parent run, sweep state.

    plan = plan_sweep("sweeps/quickstart.yaml", name=None, address=None, resume=False,
                      storage_path=None, tracking_uri=None)

Trials run in their own working directories (and on a cluster, on other machines), so every path
they get is absolute. For a local sqlite store the driver puts one MLflow server in front of it
for the sweep's duration (no `database is locked`). `results/<name>/sweep.json` and `sweep.yaml`
record the sweep so that `--resume` and `carclf report` find it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from mlflow.entities import Param

from carclf.config import validate_run_config
from carclf.core import paths
from carclf.core.errors import CarclfError, SweepError
from carclf.core.files import USER_FILE_MODE, check_can_create, new_temp_file
from carclf.data.prepare import decode_cache_for
from carclf.data.scan import scan_folder
from carclf.tracking.browse import mark_experiment, save_sweep_view
from carclf.tracking.runs import ensure_experiment, resolve_tracking_uri
from carclf.tracking.server import TrackingServer
from sweeps.run.cluster import resolve_cluster_settings
from sweeps.run.prefetch import prefetch_sweep_features
from sweeps.run.records import ROLE_TAG, SWEEP_TAG
from sweeps.run.trial import TrialContext
from sweeps.run.watchdog import TrackingEndpoint, watch_server
from sweeps.search.spec import SweepSpec, describe_space, load_sweep_spec
from sweeps.search.studies import searched_fields

log = logging.getLogger(__name__)


@dataclass
class SweepPlan:
    """The checked sweep and where everything goes; on --resume, the saved state it continues from."""

    spec_path: Path
    spec: SweepSpec
    name: str
    out_dir: Path  # results/<name>/
    text: str  # the sweep file as given: saved beside the results and in the parent run
    state: dict | None  # sweep.json of the sweep being resumed, else None
    overrides: dict  # merged into every trial's RunConfig: absolute data/cache paths, tracking
    uri: str  # the tracking store
    storage: str  # Ray Tune's storage
    experiment: str

    @property
    def exp_path(self) -> str:
        """Where Ray Tune keeps this sweep's state (what --resume restores)."""
        return f"{self.storage.rstrip('/')}/{self.name}"


def plan_sweep(spec_path, *, name: str | None, address: str | None, resume: bool, storage_path: str | None,
               tracking_uri: str | None) -> SweepPlan:
    """The sweep file validated, every path absolute, and on a cluster what every node can reach."""
    spec_path = Path(spec_path)
    spec = _resolve_weights_paths(load_sweep_spec(spec_path))
    source = "--name" if name is not None else (f"{spec_path}: name" if spec.name else
                                                f"the sweep name taken from {spec_path.name} (pass --name)")
    name = name if name is not None else spec.name or spec_path.stem
    out_dir = paths.sweep_dir(name, source)
    text, state = _prepare(spec_path, spec, name, out_dir, resume)
    overrides = _path_overrides(spec, address)
    uri = _tracking_uri(spec, state["tracking_uri"]) if state else _tracking_uri(spec, tracking_uri)  # checked
    storage = state["storage_path"] if state else _storage(storage_path, out_dir)
    uri, storage = _cluster_settings(address, uri, storage, spec, overrides)
    experiment = state["experiment"] if state else spec.base.get("tracking", {}).get("experiment", "carclf")
    return SweepPlan(spec_path, spec, name, out_dir, text, state, overrides, uri, storage, experiment)


def prepare_stores(plan: SweepPlan, address: str | None) -> None:
    """Before any trial: the tracking database and experiment exist, the decode and feature caches are filled."""

    # database and experiment created once, here, before any trial
    ensure_experiment(plan.experiment, plan.uri, created_by=f"carclf sweep {plan.name}")
    local = not (address or "").startswith("ray://")  # a Ray client may not see the data
    if plan.spec.warm_cache and local:
        warm_decode_cache(plan.spec, plan.overrides)
    if plan.spec.warm_features and local:

        prefetch_sweep_features(plan.spec, plan.overrides)


def open_parent_run(client, trial_uri: str, plan: SweepPlan) -> str:
    """The sweep's parent run: running again on --resume, else created and recorded in results/<name>/."""
    if plan.state:
        parent = plan.state["parent_run_id"]
        client.update_run(parent, status="RUNNING")
        _show_in_ui(client, parent, plan)
        return parent
    parent = _start_parent(client, trial_uri, plan.spec, plan.name, plan.experiment, plan.text)
    _write_text(plan.out_dir / "sweep.yaml", plan.text)
    _write_text(plan.out_dir / "sweep.json", json.dumps(
        {"name": plan.name, "parent_run_id": parent, "experiment": plan.experiment, "tracking_uri": plan.uri,
         "storage_path": plan.storage, "metric": plan.spec.metric, "mode": plan.spec.mode}, indent=2) + "\n")
    _show_in_ui(client, parent, plan)
    return parent


def _show_in_ui(client, parent_run_id: str, plan: SweepPlan) -> None:
    """The experiment opens as a model-training one, and the sweep's trials get a saved view (never raises)."""

    try:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
    except Exception as e:  # noqa: BLE001 - a missing view is no reason to stop a sweep
        log.warning("no MLflow UI view for sweep %r: %s", plan.name, e)
        return
    mark_experiment(client, experiment_id)
    save_sweep_view(client, experiment_id, plan.name, plan.spec.metric, plan.spec.mode, searched_fields(plan.spec))


def trial_context(plan: SweepPlan, trial_uri: str, parent_run_id: str,
                  experiment_fn: Callable | None = None, orphans: tuple[str, ...] = ()) -> TrialContext:
    """What every trial gets besides its sampled parameters; trials log to `trial_uri`."""
    plan.overrides["tracking"] = {"uri": trial_uri, "experiment": plan.experiment}
    return TrialContext(sweep=plan.name, spec=plan.spec, overrides=plan.overrides, parent_run_id=parent_run_id,
                        tracking_uri=trial_uri, resumed=bool(plan.state), experiment_fn=experiment_fn,
                        orphans=tuple(orphans))


# ---------------------------------------------------------------------- paths and tracking


def _absolute(path: str | Path, field_name: str, must_exist: bool) -> Path:
    """Relative paths are taken from the working directory, then from the project root."""
    found = paths.locate(path)
    if must_exist and not found.exists():
        places = " and ".join(dict.fromkeys(str(p) for p in (Path.cwd(), paths.project_root())))
        raise SweepError(f"{field_name}: {path} does not exist (looked in {places})")
    return found.resolve()


def _storage(storage_path: str | None, out_dir: Path) -> str:
    """Ray's storage: URIs (s3://, gs://, ...) as given, local paths made absolute, default under results/."""
    if not storage_path:
        return str(out_dir / "ray")
    if "://" in storage_path:
        return storage_path
    storage = _absolute(storage_path, "--storage-path", False)
    _check_storage(storage)
    return str(storage)


def _check_storage(storage: Path) -> None:
    """A local --storage-path is a folder a file can be made in, checked before Ray starts (Tune fails late)."""

    if storage.exists() and not storage.is_dir():
        raise SweepError(f"--storage-path {storage} is a file; Ray Tune keeps its state in a folder")
    try:
        check_can_create(storage / "experiment_state.json")
    except CarclfError as e:
        raise SweepError(f"--storage-path: {e} (pick a folder you can write to)") from None


def _path_overrides(spec: SweepSpec, address: str | None = None) -> dict:
    """Absolute data and cache paths (and weights files) for every trial: one shared cache per sweep.

    Through a Ray client (ray://) the driver may not see the data at all: the paths must then be
    absolute as the cluster sees them, and the per-node check in sweeps.run.cluster tests them there.
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
            if isinstance(value, list):  # one per member of a stacked backbone
                d[section][name] = [_weights_path(v, f"{where}.{section}.{name}") for v in value]
            elif value:
                d[section][name] = _weights_path(value, f"{where}.{section}.{name}")
        return d

    models = {k: e.model_copy(update={"config": fix(e.config, f"models.{k}.config")}) for k, e in spec.models.items()}
    return spec.model_copy(update={"base": fix(spec.base, "base"), "models": models})


def _weights_path(value: str, where: str) -> str:
    """A weights keyword as it is, a file made absolute."""
    return value if value in ("imagenet", "none") else str(_absolute(value, where, True))


def warm_decode_cache(spec: SweepSpec, overrides: dict) -> None:
    """Decode every image once, on the driver, at each image size the sweep uses.

    Otherwise the first trials, started together, would all decode the same images.
    """

    data = overrides["data"]
    sizes = sorted({validate_run_config(spec.base_config(k)).data.image_size for k in spec.models})
    for size in sizes:
        print(f"decode cache: {data['path']} at {size} px -> {data['cache_dir']}", flush=True)
        scan_folder(data["path"], cache=decode_cache_for(data["cache_dir"], size), progress=True)


def _tracking_uri(spec: SweepSpec, tracking_uri: str | None) -> str:
    return resolve_tracking_uri(tracking_uri or spec.base.get("tracking", {}).get("uri"))


def _weights_files(spec: SweepSpec) -> list[str]:
    files = set()
    for key in spec.models:
        cfg = spec.base_config(key)
        for section, name in (("model", "weights"), ("svm", "backbone_weights")):
            value = cfg.get(section, {}).get(name)
            for each in value if isinstance(value, list) else [value]:
                if each and each not in ("imagenet", "none"):
                    files.add(str(each))
    return sorted(files)


def _cluster_settings(address: str | None, uri: str, storage: str, spec: SweepSpec,
                      overrides: dict) -> tuple[str, str]:
    """On a cluster (--address), what every node can reach, checked by sweeps.run.cluster."""
    if address is None:
        return uri, storage
    return resolve_cluster_settings(address, uri, storage, data_path=overrides["data"]["path"],
                                    cache_dir=overrides["data"]["cache_dir"], files=_weights_files(spec))


def _wants_server(spec: SweepSpec, uri: str) -> bool:
    if not uri.startswith("sqlite:///") or spec.tracking_server == "never":
        return False
    return True  # trials are separate processes (and the driver writes too): one writer in front of sqlite


@contextlib.contextmanager
def _tracking_endpoint(spec: SweepSpec, uri: str,
                       on_lost: Callable[[str], None] | None = None) -> Iterator[TrackingEndpoint]:
    """Where trials log: a watched loopback MLflow server in front of a local sqlite store, else the store.

    The server is restarted on the same port if it dies (sweeps.run.watchdog); `on_lost` is called if
    it cannot be, and the endpoint's `lost` then says why.
    """
    if not _wants_server(spec, uri):
        yield TrackingEndpoint(uri)
        return

    db = Path(uri[len("sqlite:///"):])
    with TrackingServer(uri, artifacts_destination=db.parent / "mlartifacts") as server, \
            watch_server(server, on_lost) as watch:
        print(f"MLflow server for this sweep, while it runs: {server.url} (backend {uri})", flush=True)
        yield TrackingEndpoint(server.url, watch)


def _stage(path: Path, write: Callable[[Path], None]) -> Path:
    """`write` into a temporary file beside `path` (removed again if writing fails); returns it. The user's
    umask applies, as for any file a user is meant to read."""

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_file(path, USER_FILE_MODE)
    try:
        write(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary file beside `path`, then moved into place; the user's umask applies."""
    tmp = _stage(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------------- sweep state (results/<name>)


@contextlib.contextmanager
def claim_sweep(plan: SweepPlan) -> Iterator[None]:
    """results/<name>/ belongs to this driver until the block ends: a second driver for the same name stops at once.

    The claim is an exclusive flock on results/<name>/sweep.lock, taken without waiting and released
    by the OS when the driver exits in any way (SIGKILL included), so `--resume` after a crash
    works. Under the lock the "already exists" check is repeated: of two sweeps started with one
    name at once, exactly one runs and the other changes nothing. A sweep refused before it wrote
    sweep.json leaves no folder behind, so the name stays free.
    """
    created = not plan.out_dir.exists()
    handle = _lock_sweep_folder(plan.out_dir, plan.name)
    try:
        if plan.state is None and (plan.out_dir / "sweep.json").exists():
            raise SweepError(f"sweep {plan.name!r} already exists in {plan.out_dir}: continue it with --resume, "
                             f"or pick another --name")
        yield
    except BaseException:
        if created and not (plan.out_dir / "sweep.json").exists():
            _remove_unused_folder(plan.out_dir)
        raise
    finally:
        handle.close()


def _lock_sweep_folder(out_dir: Path, name: str):
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = out_dir / "sweep.lock"
    while True:
        handle = open(lock, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise _running(name, lock) from None
        # The lock file may have been removed (and made again) while this waited for it: lock the current one.
        if lock.exists() and os.fstat(handle.fileno()).st_ino == lock.stat().st_ino:
            break
        handle.close()
    handle.truncate(0)
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def _running(name: str, lock: Path) -> SweepError:
    try:
        holder = lock.read_text(encoding="utf-8").strip() or "another process"
    except OSError:
        holder = "another process"
    return SweepError(f"sweep {name!r} is running right now (driver {holder} holds {lock}); wait for it to end, "
                      "or pick another --name")


def _is_running(out_dir: Path) -> bool:
    """Whether a driver holds results/<name>/sweep.lock now (without taking it)."""

    try:
        with open(out_dir / "sweep.lock", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def _remove_unused_folder(out_dir: Path) -> None:
    """The folder this driver made, if nothing but its lock is in it."""
    with contextlib.suppress(OSError):
        if {p.name for p in out_dir.iterdir()} <= {"sweep.lock"}:
            (out_dir / "sweep.lock").unlink(missing_ok=True)
            out_dir.rmdir()


def _read_state(out_dir: Path) -> dict:
    f = out_dir / "sweep.json"
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SweepError(f"cannot resume: {f} is missing or unreadable ({e})") from None


def _start_parent(client, uri: str, spec: SweepSpec, name: str, experiment: str,
                  sweep_text: str) -> str:
    exp_id = ensure_experiment(experiment, uri)
    run = client.create_run(exp_id, run_name=name, tags={SWEEP_TAG: name, ROLE_TAG: "sweep",
                                                         "mlflow.note.content": spec.description or name})
    rid = run.info.run_id
    params = {"metric": spec.metric, "mode": spec.mode, "num_samples": spec.num_samples,
              "max_concurrent_trials": spec.max_concurrent_trials, "models": ",".join(spec.models),
              "time_budget_s": spec.time_budget_s, "max_failures": spec.max_failures,
              "seed.sampler": spec.seeds.sampler, "seed.run": spec.seeds.run,
              "scheduler": json.dumps(spec.scheduler.model_dump() if spec.scheduler else None)}

    client.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_text(rid, sweep_text, "sweep.yaml")
    client.log_dict(rid, describe_space(spec), "search_space.json")
    return rid


def _prepare(spec_path: Path, spec: SweepSpec, name: str, out_dir: Path, resume: bool) -> tuple[str, dict | None]:
    """The sweep file's text, and on --resume the saved state (refusing a changed sweep file)."""
    text = spec_path.read_text(encoding="utf-8")
    if not resume:
        if (out_dir / "sweep.json").exists():
            if _is_running(out_dir):
                raise _running(name, out_dir / "sweep.lock")
            raise SweepError(f"sweep {name!r} already exists in {out_dir}: continue it with --resume, "
                             f"or pick another --name")
        return text, None
    if not (out_dir / "sweep.json").exists() and _is_running(out_dir):  # its first driver is still starting
        raise _running(name, out_dir / "sweep.lock")
    state = _read_state(out_dir)
    saved = out_dir / "sweep.yaml"
    if saved.is_file() and saved.read_text(encoding="utf-8") != text:
        raise SweepError(f"cannot resume {name!r}: {spec_path} differs from the sweep it started with ({saved}); "
                         "Ray needs the same search space to continue")
    return text, state
