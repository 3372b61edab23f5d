"""Load a model only when it is exactly what carclf logs, checked before MLflow runs anything from it.

    model, metadata = load_checked_model("models:/carclf-svm_rbf@champion")

A carclf model is an MLflow "models from code" pyfunc, and loading one runs Python shipped inside
it: MLflow executes its entry file (`pyfunc_model.py`) and puts its `code/` folder first on
sys.path. Anyone who can write to a tracking server can change those files, or turn the model into
a cloudpickle or another flavour, and so run code on whoever loads it. So the model's files are
downloaded into a private folder and accepted only when
- its MLmodel has carclf's one flavour and loader: python_function, models from code with the entry
  `pyfunc_model.py`, code in `code/`, the artifacts `spec`, `weights` and (SVM) `svm`; nothing pickled;
- `pyfunc_model.py` and `code/car_classifier.py` are, byte for byte (sha256), this carclf's own files;
- the artifacts are the formats carclf writes: a JSON spec, a torch zip archive of weights (which the
  shipped code reads with `weights_only=True`) and a skops file naming no type outside the shipped
  `SVM_TRUSTED_TYPES` (read from carclf, never from the model);
- it holds no other file, and nothing that is not a plain file (a stray `__pycache__` would be run
  in place of the checked source).
MLflow then loads that checked folder, not the URI, so a file changed on the server after the
check is never what runs. Nothing here imports, executes or unpickles anything from the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import sys
import tempfile
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import skops.io
import torch
import yaml
from mlflow.exceptions import MlflowException

from carclf import shipped
from carclf.core.errors import TrackingError
from carclf.core.redact import redact
from carclf.shipped.car_classifier import SPEC_VERSION, SVM_TRUSTED_TYPES

ENTRY = "pyfunc_model.py"
MODULE = "code/car_classifier.py"
LOADER = "mlflow.pyfunc.loaders.code_model"  # MLflow's loader for a models-from-code pyfunc
ARTIFACTS = {"spec": "artifacts/spec.json", "weights": "artifacts/weights.pt", "svm": "artifacts/svm.skops"}
ENV = {"conda": "conda.yaml", "virtualenv": "python_env.yaml"}
# The python_function keys MLflow writes for carclf's model. Any other changes what loading runs:
# python_model (a cloudpickled object), data, model_config, predict_fn, ...
FLAVOR_KEYS = {"artifacts", "cloudpickle_version", "code", "env", "loader_module", "model_code_path",
               "python_version", "streamable"}
# Files MLflow writes beside the model that loading never executes (requirements.txt is read: checked below).
DATA_FILES = {"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "input_example.json",
              "serving_input_example.json", "registered_model_meta"}
# What carclf's requirements.txt holds: a package name, pinned or not. No options, URLs or file references.
_REQUIREMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(==[A-Za-z0-9.!+*-]+)?")
_RELOG = "log it again with this carclf (`carclf report NAME`, then `carclf promote NAME`)"


def shipped_code() -> dict[str, str]:
    """Model-relative path -> sha256 of the file this carclf ships there (what carclf.tracking.runs logs)."""
    return {ENTRY: _sha256(shipped.FOLDER / "pyfunc_model.py"), MODULE: _sha256(shipped.FOLDER / "car_classifier.py")}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _refuse(uri: str, what: str) -> TrackingError:
    return TrackingError(f"refusing model {redact(uri)}: {what}; nothing from it was loaded")


def model_files(folder: Path, uri: str) -> set[str]:
    """Every file under `folder`, as model-relative POSIX paths; refused if anything is not a plain file."""
    files = set()
    for root, dirs, names in os.walk(folder):
        for name in [*dirs, *names]:
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                raise _refuse(uri, f"{rel} is not a plain file or folder")
            if name in names:
                files.add(rel)
    return files


def read_mlmodel(folder: Path, uri: str) -> dict:
    """The MLmodel file as data (YAML read safely: no tags that build Python objects)."""

    path = folder / "MLmodel"
    if not path.is_file():
        raise _refuse(uri, "it has no MLmodel file, so it is not an MLflow model")
    try:
        mlmodel = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise _refuse(uri, f"its MLmodel is not plain YAML ({e})") from None
    if not isinstance(mlmodel, dict):
        raise _refuse(uri, "its MLmodel is not a mapping")
    return mlmodel


def carclf_metadata(mlmodel: dict, uri: str) -> dict:
    """The model's carclf metadata (classes, input config, kind); refused unless carclf logged it as a pyfunc."""
    meta = mlmodel.get("metadata")
    meta = dict(meta) if isinstance(meta, dict) else {}
    missing = [k for k in ("classes", "input_config", "kind") if k not in meta]
    if missing:
        raise TrackingError(f"model {redact(uri)} was not logged by carclf (its metadata lacks {', '.join(missing)})")
    if "pyfunc_format" not in meta:
        raise TrackingError(f"model {redact(uri)} was logged by an older carclf that needs features or tensors, "
                            "not photos; run `carclf report` again and promote its models")
    return meta


def check_flavor(mlmodel: dict, uri: str) -> dict:
    """The python_function configuration, if it is carclf's models-from-code one and nothing else."""
    flavors = mlmodel.get("flavors")
    if not isinstance(flavors, dict) or set(flavors) != {"python_function"}:
        names = sorted(flavors) if isinstance(flavors, dict) else flavors
        raise _refuse(uri, f"its MLmodel has the flavours {names}; carclf writes python_function alone")
    conf = flavors["python_function"]
    if not isinstance(conf, dict):
        raise _refuse(uri, "its python_function flavour is not a mapping")
    if "python_model" in conf:
        raise _refuse(uri, f"its MLmodel loads a pickled Python object (python_model: {conf['python_model']}); "
                           "carclf models are code carclf ships, never pickles")
    if conf.get("loader_module") != LOADER:
        raise _refuse(uri, f"its MLmodel names the loader {conf.get('loader_module')!r}, not carclf's {LOADER}")
    extra = sorted(set(conf) - FLAVOR_KEYS)
    if extra:
        raise _refuse(uri, f"its python_function flavour has settings carclf never writes: {', '.join(extra)}")
    entry = conf.get("model_code_path")
    if not isinstance(entry, str) or os.path.basename(entry) != ENTRY:
        raise _refuse(uri, f"its MLmodel runs the entry file {entry!r}, not carclf's {ENTRY}")
    if conf.get("code") != "code":
        raise _refuse(uri, f"its MLmodel puts {conf.get('code')!r} on the import path, not carclf's code/ folder")
    if conf.get("env", ENV) != ENV:
        raise _refuse(uri, f"its MLmodel names the environment files {conf.get('env')!r}, not {ENV}")
    return conf


def check_artifacts(conf: dict, uri: str) -> dict[str, str]:
    """Artifact name -> model-relative path: carclf's spec and weights, and svm for an SVM, where carclf puts them."""
    artifacts = conf.get("artifacts")
    if not isinstance(artifacts, dict) or set(artifacts) not in ({"spec", "weights"}, {"spec", "weights", "svm"}):
        names = sorted(artifacts) if isinstance(artifacts, dict) else artifacts
        raise _refuse(uri, f"its artifacts are {names}; carclf writes spec and weights, and svm for an SVM")
    for name, info in artifacts.items():
        path = info.get("path") if isinstance(info, dict) else None
        if path != ARTIFACTS[name]:
            raise _refuse(uri, f"its artifact {name} is at {path!r}, not {ARTIFACTS[name]}")
    return {name: ARTIFACTS[name] for name in artifacts}


def check_file_list(files: set[str], artifacts: dict[str, str], uri: str) -> None:
    """Exactly carclf's files: the entry, the inference module, the artifacts, MLflow's data files."""
    required = {"MLmodel", ENTRY, MODULE, *artifacts.values()}
    missing = sorted(required - files)
    if missing:
        raise _refuse(uri, f"it lacks {', '.join(missing)}")
    extra = sorted(files - required - DATA_FILES)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise _refuse(uri, f"it holds files carclf never writes: {shown}")


def check_code(folder: Path, uri: str) -> None:
    """The entry file and the inference module are this carclf's own, byte for byte."""

    for rel, expected in shipped_code().items():
        if _sha256(folder / rel) != expected:
            try:
                mine = f"carclf {version('carclf')}"
            except PackageNotFoundError:
                mine = "this carclf"
            raise _refuse(uri, f"its {rel} is not the one {mine} ships (it was logged by another carclf version, "
                               f"or changed since); carclf runs only its own code: {_RELOG}")


def check_spec(folder: Path, artifacts: dict[str, str], uri: str) -> dict:
    """spec.json: JSON of the spec version this carclf reads, of a kind that matches the artifacts."""

    try:
        spec = json.loads((folder / ARTIFACTS["spec"]).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise _refuse(uri, f"its {ARTIFACTS['spec']} is not JSON ({e})") from None
    if not isinstance(spec, dict) or spec.get("version") != SPEC_VERSION:
        found = spec.get("version") if isinstance(spec, dict) else spec
        raise _refuse(uri, f"its spec has version {found!r}, not {SPEC_VERSION}: {_RELOG}")
    kind = spec.get("kind")
    if kind not in ("network", "svm") or (kind == "svm") != ("svm" in artifacts):
        raise _refuse(uri, f"its spec says kind {kind!r} but its artifacts are {sorted(artifacts)}")
    check_kwargs(spec.get("kwargs", {}), uri)
    return spec


# Constructor arguments that fetch or read weights (torchvision, timm): the weights come from weights.pt alone.
_WEIGHTS_KWARGS = {"weights", "weights_backbone", "progress", "pretrained", "pretrained_backbone", "pretrained_cfg",
                   "pretrained_cfg_overlay", "checkpoint_path", "model_dir", "file", "url"}


def check_kwargs(kwargs, uri: str) -> None:
    """The network's constructor arguments in spec.json: plain values, none of which loads or downloads weights."""
    if not isinstance(kwargs, dict):
        raise _refuse(uri, f"its spec's kwargs are not a mapping ({type(kwargs).__name__})")
    fetching = sorted(set(kwargs) & _WEIGHTS_KWARGS)
    if fetching:
        raise _refuse(uri, f"its spec passes constructor arguments carclf never writes: {', '.join(fetching)} "
                           "(they would load or download other weights)")
    plain = (str, int, float, bool, type(None))
    odd = sorted(k for k, v in kwargs.items()
                 if not (isinstance(v, plain) or (isinstance(v, list) and all(isinstance(x, plain) for x in v))))
    if odd:
        raise _refuse(uri, f"its spec's kwargs {', '.join(odd)} are not plain values")


def check_weights(folder: Path, artifacts: dict[str, str], uri: str) -> None:
    """weights.pt is a torch zip archive (read later with weights_only=True by the checked shipped code);
    svm.skops names no type outside carclf's own trusted list."""
    if not zipfile.is_zipfile(folder / ARTIFACTS["weights"]):
        raise _refuse(uri, f"its {ARTIFACTS['weights']} is not a torch state_dict archive")
    check_state_dict(folder / ARTIFACTS["weights"], uri)
    if "svm" in artifacts:
        check_skops(folder / ARTIFACTS["svm"], uri)


def check_state_dict(path: Path, uri: str) -> None:
    """weights.pt holds tensors by name and nothing else, read as the model will read it (weights_only: a pickled
    object is refused by torch, not built) but memory-mapped, so the check costs no copy of the weights."""

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as e:
        # torch explains how to load it anyway; only its reason belongs here ("Unsupported global: GLOBAL io.open")
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
        reason = next((ln.split("error:", 1)[1].split(" was not")[0].strip() for ln in lines
                       if ln.startswith("WeightsUnpickler error:")), lines[0])[:200]
        raise _refuse(uri, f"its {ARTIFACTS['weights']} is not a plain state_dict: torch refused it "
                           f"({type(e).__name__}: {reason})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise _refuse(uri, f"its {ARTIFACTS['weights']} holds {type(state).__name__}, not a state_dict of tensors")


def check_skops(path: Path, uri: str) -> None:
    """Refused unless every type the skops file names is one skops trusts or carclf's SVM_TRUSTED_TYPES.

    skops reads only the file's schema here: no type is imported and no object built.
    """

    try:
        untrusted = sorted(set(skops.io.get_untrusted_types(file=path)) - set(SVM_TRUSTED_TYPES))
    except Exception as e:  # noqa: BLE001 - a damaged or forged file fails in many ways inside skops
        raise _refuse(uri, f"its {ARTIFACTS['svm']} is not a readable skops file ({type(e).__name__}: {e})") from None
    if untrusted:
        raise _refuse(uri, f"its {ARTIFACTS['svm']} names types carclf does not trust: {', '.join(untrusted)}")


def check_requirements(folder: Path, uri: str) -> None:
    """requirements.txt (which MLflow reads on load) holds package names, pinned or not, and nothing else."""
    path = folder / "requirements.txt"
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip() and not _REQUIREMENT.fullmatch(line.strip()):
            raise _refuse(uri, f"its requirements.txt holds {line.strip()!r}; carclf writes only pinned package names")


def check_model_dir(folder: str | Path, uri: str) -> dict:
    """The carclf metadata of the model in `folder` (downloaded from `uri`), if it is exactly what carclf
    logs; TrackingError naming the URI and what is wrong if not. Reads files, runs nothing from them."""
    folder = Path(folder)
    files = model_files(folder, uri)
    mlmodel = read_mlmodel(folder, uri)
    meta = carclf_metadata(mlmodel, uri)
    artifacts = check_artifacts(check_flavor(mlmodel, uri), uri)
    check_file_list(files, artifacts, uri)
    check_code(folder, uri)
    check_spec(folder, artifacts, uri)
    check_weights(folder, artifacts, uri)
    check_requirements(folder, uri)
    return meta


def download_model(model_uri: str, folder: str | Path) -> Path:
    """The model's files copied into `folder` (also from a local store or path: the copy is ours alone)."""

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(folder)))
    except (MlflowException, OSError) as e:
        raise TrackingError(f"cannot load model {redact(model_uri)}: {redact(getattr(e, 'message', e))}") from None


def load_checked_model(model_uri: str) -> tuple[Any, dict]:
    """The pyfunc model behind `model_uri` and its carclf metadata, loaded from a private copy that
    `check_model_dir` accepted. MLflow's tracking and registry URIs must be set already."""

    with tempfile.TemporaryDirectory(prefix="carclf-model-") as tmp:
        local = download_model(model_uri, tmp)
        meta = check_model_dir(local, model_uri)
        code_dir = str(local / "code")
        try:
            model = mlflow.pyfunc.load_model(str(local))
        except (MlflowException, OSError) as e:
            raise TrackingError(f"cannot load model {redact(model_uri)}: {redact(getattr(e, 'message', e))}") from None
        finally:
            # MLflow leaves the code folder first on sys.path; once this folder is gone, anyone who made a folder
            # of the same name would decide what a later import finds. The module it held is imported already.
            sys.path[:] = [p for p in sys.path if p != code_dir]
    return model, meta
