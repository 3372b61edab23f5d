"""Where carclf keeps things: the project root, the MLflow database, caches, sweep results."""

from __future__ import annotations

import os
import re
from pathlib import Path

from carclf.core.errors import SweepError

# A sweep name becomes a folder under results/ (and Ray's experiment folder): one plain path
# component, so `--name ../../x` or `/tmp/x` cannot put files outside results/.
_SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def project_root() -> Path:
    """The folder that holds `mlflow.db` and `results/`.

    `CARCLF_PROJECT_ROOT` wins; a source checkout (editable install) uses the
    checkout; otherwise the current directory. Always absolute, because Ray
    runs each trial in its own working directory.
    """
    env = os.environ.get("CARCLF_PROJECT_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "carclf").is_dir():
        return checkout
    return Path.cwd().resolve()


def locate(path: str | Path) -> Path:
    """A user's path: absolute as given; relative, looked up in the working directory, then the project
    root (where a sweep file's `data.path` usually points from); the working directory's if in neither."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    return next((c for c in (Path.cwd() / p, project_root() / p) if c.exists()), Path.cwd() / p)


def cache_root() -> Path:
    """Default cache folder: `CARCLF_CACHE_DIR`, else `$XDG_CACHE_HOME/carclf`, else `~/.cache/carclf`."""
    env = os.environ.get("CARCLF_CACHE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "carclf").resolve()


def default_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else an absolute sqlite URI to `mlflow.db` at the project root."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def results_root() -> Path:
    """Sweep outputs (Ray storage, results tables, reports) live under `<project>/results/`."""
    return project_root() / "results"


def check_sweep_name(name: str, source: str = "sweep name") -> str:
    """`name` if it is a safe folder name (letters, digits, '_', '-', '.'; starting with a letter or digit)."""
    if not isinstance(name, str) or not _SWEEP_NAME.fullmatch(name):
        raise SweepError(f"{source} {name!r} is not allowed: use up to 100 letters, digits, '_', '-' or '.', "
                         "starting with a letter or digit (it names the folder results/<name>/)")
    return name


def sweep_dir(name: str, source: str = "sweep name") -> Path:
    """`results/<name>/` for a checked sweep name."""
    return results_root() / check_sweep_name(name, source)
