"""Predict car models for image files with a registered or logged model.

    carclf predict models:/carclf-svm@champion photos/ --top-k 3 --out preds.csv
    carclf predict runs:/RUN_ID/model car.jpg

Every model carclf logs is one MLflow pyfunc model that takes encoded image bytes and answers
class names (see carclf/shipped/car_classifier.py, which travels inside it). This command goes through
that same model, `mlflow.pyfunc.load_model(...).predict(DataFrame({"image": [bytes, ...]}))`,
as a notebook or `mlflow models serve` would: there is one inference path. Loading a pyfunc runs
code shipped inside the model, so the model's files are downloaded and checked to be carclf's own
first, and MLflow loads that checked copy (carclf/serving/model_check.py).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from carclf.core.errors import DataError
from carclf.core.files import USER_FILE_MODE, atomic_path, check_can_create
from carclf.core.redact import redact
from carclf.data.scan import IMAGE_EXTENSIONS
from carclf.serving.model_check import load_checked_model
from carclf.tracking.runs import resolve_tracking_uri


def use_tracking_uri(uri: str | None = None) -> str:
    """Point MLflow (runs and registry) at `uri`, else MLFLOW_TRACKING_URI, else the project's database."""

    resolved = resolve_tracking_uri(uri)
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    return resolved


def load_model(model_uri: str, *, tracking_uri: str | None = None):
    """The pyfunc model behind `models:/NAME@alias`, `models:/NAME/3` or `runs:/ID/model`, with its metadata.

    Only a model that is exactly what carclf logs is loaded, checked before MLflow runs anything from
    it (see carclf.serving.model_check); anything else is a TrackingError naming the URI and what is wrong.
    """

    use_tracking_uri(tracking_uri)
    return load_checked_model(model_uri)


def resolve_model(model_uri: str, *, tracking_uri: str | None = None) -> tuple[str, str]:
    """(the URI to load, what it is in words): `models:/NAME@ALIAS` becomes `models:/NAME/VERSION`, so the
    model predicted with is the version named, even if the alias moves meanwhile."""

    use_tracking_uri(tracking_uri)
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))/?", model_uri)
    try:
        if match:
            name, alias, number = match.groups()
            client = MlflowClient()
            version = (client.get_model_version_by_alias(name, alias) if alias
                       else client.get_model_version(name, number))
            return f"models:/{name}/{version.version}", f"{model_uri} = {name} v{version.version}" + _whose(version.tags)
        if model_uri.startswith("runs:/"):
            run = MlflowClient().get_run(model_uri[len("runs:/"):].split("/")[0])
            tags = run.data.tags
            return model_uri, model_uri + _whose({"carclf.family": tags.get("carclf.sweep_model", ""),
                                                  "carclf.sweep": tags.get("carclf.sweep", "")})
    except MlflowException as e:  # the loader says the same with the URI; here only the description is lost
        return model_uri, f"{redact(model_uri)} (not found in the registry: {redact(e.message)})"
    return model_uri, model_uri


def _whose(tags: dict) -> str:
    """' (family F of sweep S, trial T; test f1_macro X for this version)', from a version's carclf tags."""
    family, sweep = tags.get("carclf.family") or tags.get("carclf.model"), tags.get("carclf.sweep")
    if not family:
        return ""
    parts = [f"family {family}" + (f" of sweep {sweep}" if sweep else "")]
    if tags.get("carclf.trial_id"):
        parts.append(f"trial {tags['carclf.trial_id']}")
    if tags.get("carclf.test_f1_macro"):
        parts.append(f"test f1_macro {float(tags['carclf.test_f1_macro']):.4f} for this version")
    return f" ({', '.join(parts)})"


def collect_images(paths: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files to predict (folders walked, sorted, hidden entries and non-images skipped) and
    (path, reason) for inputs that do not exist."""

    files, missing = [], []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [Path(root) / n for n in sorted(names)
                          if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_EXTENSIONS]
        elif p.is_file():
            files.append(p)  # named explicitly: tried whatever its extension
        else:
            missing.append((str(p), "no such file or folder"))
    return files, missing


def _read(path: Path) -> bytes | str:
    """The file's bytes, or the reason it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}"


def _rows(paths: list[str], predictions: pd.DataFrame, k: int) -> list[dict]:
    """path, error, then class_1, prob_1, ... class_k, prob_k (most likely first) per image."""
    rows = []
    for path, pred in zip(paths, predictions.itertuples(index=False)):
        if pred.error:
            rows.append({"path": path, "error": f"cannot decode {path}: {pred.error}"})
            continue
        row: dict[str, Any] = {"path": path, "error": ""}
        for rank, (name, p) in enumerate(zip(pred.top_classes[:k], pred.top_probabilities[:k]), start=1):
            row[f"class_{rank}"], row[f"prob_{rank}"] = name, float(p)
        rows.append(row)
    return rows


def predict_paths(model_uri: str, paths: Iterable[str | Path], *, top_k: int = 3, batch_size: int = 32,
                  tracking_uri: str | None = None) -> pd.DataFrame:
    """Top-k predictions per image; an unreadable file gets a row with its error and no classes."""
    if top_k < 1:
        raise DataError(f"--top-k must be at least 1, got {top_k}")
    model, meta = load_model(model_uri, tracking_uri=tracking_uri)
    files, missing = collect_images(paths)
    if not files and not missing:
        raise DataError(f"no image files in {', '.join(str(p) for p in paths)}")
    rows = [{"path": p, "error": reason} for p, reason in missing]
    for start in range(0, len(files), batch_size):
        read = [(str(p), _read(p)) for p in files[start:start + batch_size]]  # a file named twice gets two rows
        rows += [{"path": p, "error": data} for p, data in read if isinstance(data, str)]
        good = [(p, data) for p, data in read if isinstance(data, bytes)]
        if good:
            frame = pd.DataFrame({"image": pd.Series([data for _, data in good], dtype=object)})
            rows += _rows([p for p, _ in good], model.predict(frame, params={"top_k": top_k}), top_k)
    k = min(top_k, len(meta["classes"]))
    columns = ["path", "error"] + [f"{c}_{i}" for i in range(1, k + 1) for c in ("class", "prob")]
    return pd.DataFrame(rows).reindex(columns=columns)


def check_writable(out: str | Path) -> Path:
    """The output path, if a file can be made there (checked before predicting); DataError naming it if not."""
    path = Path(out).expanduser()
    folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("."))
    if path.is_dir():
        raise DataError(f"--out {path}: is a folder; give a file name such as {path / 'predictions.csv'}")
    if not folder.is_dir():
        raise DataError(f"--out {path}: cannot write there ({folder} is not a writable folder)")

    check_can_create(path, "--out", "pick another --out")
    return path


def write_csv(df: pd.DataFrame, out: str | Path) -> Path:
    """Write the predictions atomically (a temp file in the same folder, then os.replace); the umask applies.

    Any failure (unwritable folder, disk full) raises DataError naming the path and leaves no file.
    """

    path = Path(out).expanduser()
    try:
        with atomic_path(path, mode=USER_FILE_MODE) as tmp:
            df.to_csv(tmp, index=False)
    except OSError as e:
        raise DataError(f"cannot write the predictions to {path}: {e.strerror or e}") from None
    return path


def format_row(row: pd.Series, k: int) -> str:
    if isinstance(row["error"], str) and row["error"]:
        return f"{row['path']}: ERROR {row['error']}"
    shown = [f"{row[f'class_{i}']} {row[f'prob_{i}']:.3f}" for i in range(1, k + 1) if f"class_{i}" in row]
    return f"{row['path']}: " + ", ".join(shown)


def summary_line(df: pd.DataFrame) -> str:
    """'N images: E errors; predicted: CLASS n, ...' (most frequent first)."""
    failed = df["error"].fillna("") != ""
    counts = df.loc[~failed, "class_1"].value_counts() if "class_1" in df else pd.Series(dtype=int)
    shown = ", ".join(f"{name} {n}" for name, n in counts.items()) or "none"
    return f"{len(df)} images: {int(failed.sum())} errors; predicted: {shown}"


def cli_predict(args) -> int:
    if args.out:
        check_writable(args.out)  # before any work: an unwritable --out is found at once
    tracking_uri = getattr(args, "tracking_uri", None)
    uri, what = resolve_model(args.model_uri, tracking_uri=tracking_uri)
    print(f"model: {what}", flush=True)
    df = predict_paths(uri, args.paths, top_k=args.top_k, tracking_uri=tracking_uri)
    failed = df["error"].fillna("") != ""
    if args.out:  # the file holds every line, errors included; the terminal gets the summary
        print(f"predictions written to {write_csv(df, args.out)}")
    else:
        for _, row in df.iterrows():
            print(format_row(row, args.top_k))
    print(summary_line(df))
    return 1 if failed.all() else 0
