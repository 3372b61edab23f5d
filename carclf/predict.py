"""Predict car models for image files with a registered or logged model.

    carclf predict models:/carclf-svm@champion photos/ --top-k 3 --out preds.csv
    carclf predict runs:/RUN_ID/model car.jpg

The model's carclf metadata (classes, input config, and for the SVM its backbone) says how
to preprocess: images are decoded and squashed to the training size exactly as the decode
cache does, then normalised by the evaluation preset. The SVM is a scikit-learn Pipeline
over CNN features, so its backbone is rebuilt from the recorded name, weights and features
mode (a randomly initialised backbone from its recorded seed) and checked against the
recorded weights hash.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from carclf.errors import CarclfError, DataError, TrackingError, WeightsError

log = logging.getLogger(__name__)

_RANDOM_PREFIX = "random-seed"


def use_tracking_uri(uri: str | None = None) -> str:
    """Point MLflow (runs and registry) at `uri`, else MLFLOW_TRACKING_URI, else the project's database."""
    import mlflow

    from carclf.tracking import resolve_tracking_uri

    resolved = resolve_tracking_uri(uri)
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    return resolved


def model_metadata(model_uri: str) -> tuple[dict, dict]:
    """(carclf metadata, MLflow flavors) of a logged model; TrackingError naming the URI if unusable."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        info = mlflow.models.get_model_info(model_uri)
    except (MlflowException, OSError) as e:
        raise TrackingError(f"cannot load model {model_uri}: {getattr(e, 'message', e)}") from None
    meta = dict(info.metadata or {})
    missing = [k for k in ("classes", "input_config", "kind") if k not in meta]
    if missing:
        raise TrackingError(f"model {model_uri} was not logged by carclf (its metadata lacks {', '.join(missing)})")
    return meta, dict(info.flavors or {})


@dataclass
class Predictor:
    """A loaded model and what it needs: classes, the input config and (SVM) the feature backbone."""

    model_uri: str
    kind: str
    classes: list[str]
    input_config: Any
    model: Any
    backbone: Any = None

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        """uint8 HxWx3 arrays at input_config.size -> class probabilities [N, n_classes]."""
        import torch

        from carclf.transforms import EvalPreset

        preset = EvalPreset(self.input_config)
        batch = torch.stack([preset(img) for img in images])
        with torch.inference_mode():
            if self.kind == "svm":
                return self._svm_probabilities(self.backbone(batch).float().flatten(1).numpy())
            logits = self.model(batch)
            return torch.softmax(logits.float(), dim=1).numpy()

    def _svm_probabilities(self, features: np.ndarray) -> np.ndarray:
        probs = self.model.predict_proba(features)
        full = np.zeros((len(features), len(self.classes)))
        full[:, np.asarray(self.model.classes_, dtype=int)] = probs  # a class unseen in training keeps 0
        return full


def load_predictor(model_uri: str, *, tracking_uri: str | None = None) -> Predictor:
    """Load a carclf model (`models:/NAME@alias`, `models:/NAME/3`, `runs:/ID/model`) ready to predict."""
    from carclf.models import InputConfig

    use_tracking_uri(tracking_uri)
    meta, _ = model_metadata(model_uri)
    ic_raw = meta["input_config"]
    ic = InputConfig(size=int(ic_raw["size"]), mean=tuple(ic_raw["mean"]), std=tuple(ic_raw["std"]))
    classes = [str(c) for c in meta["classes"]]
    if meta["kind"] == "svm":
        return Predictor(model_uri, "svm", classes, ic, _load_flavor(model_uri, "sklearn"), _backbone(meta, ic))
    if meta["kind"] != "network":
        raise TrackingError(f"model {model_uri}: unknown carclf kind {meta['kind']!r}")
    model = _load_flavor(model_uri, "pytorch")
    try:
        model.eval()
    except NotImplementedError:
        pass  # a torch.export (pt2) program is fixed in the eval mode it was exported in
    return Predictor(model_uri, "network", classes, ic, model)


def _load_flavor(model_uri: str, flavor: str):
    import importlib

    from mlflow.exceptions import MlflowException

    module = importlib.import_module(f"mlflow.{flavor}")
    try:
        return module.load_model(model_uri)
    except (MlflowException, OSError) as e:
        raise TrackingError(f"cannot load model {model_uri}: {getattr(e, 'message', e)}") from None


def _backbone(meta: dict, ic) -> Any:
    """Rebuild the SVM's feature extractor as training did; a different weights file is refused."""
    from carclf.models import build_backbone, weights_sha256
    from carclf.training import seed_everything

    name, weights, recorded = meta["backbone"], meta["backbone_weights"], str(meta.get("backbone_sha256") or "")
    if recorded.startswith(_RANDOM_PREFIX):
        # A random init is reproducible only from the same seed, as the feature extraction seeded it.
        seed_everything(int(recorded[len(_RANDOM_PREFIX):]))
    else:
        sha = weights_sha256(name, weights)
        if recorded and sha != recorded:
            raise WeightsError(f"backbone weights {weights!r} for {name} have sha256 {str(sha)[:12]}..., but the SVM "
                               f"was trained on features from {recorded[:12]}...; provide the same weights file")
    backbone = build_backbone(name, weights=weights, features=meta.get("features", "gap"), image_size=ic.size)
    return backbone.eval()


def collect_images(paths: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files to predict (folders walked, sorted, hidden entries and non-images skipped) and
    (path, reason) for inputs that do not exist."""
    from carclf.data import IMAGE_EXTENSIONS

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


def _decode(path: Path, size: int) -> np.ndarray:
    from carclf.cache import decode_image, read_error

    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return decode_image(data, size)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        # PIL names the in-memory buffer ("<_io.BytesIO object at 0x...>"), which says nothing to a user
        reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", read_error(e))
        raise DataError(f"cannot decode {path}: {reason}") from None


def top_k_rows(paths: list[str], probs: np.ndarray, classes: list[str], k: int) -> list[dict]:
    """One row per image: path, then class_1, prob_1, ... class_k, prob_k (most likely first)."""
    k = min(k, len(classes))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    rows = []
    for path, p, idx in zip(paths, probs, order):
        row: dict[str, Any] = {"path": path, "error": ""}
        for rank, j in enumerate(idx, start=1):
            row[f"class_{rank}"], row[f"prob_{rank}"] = classes[j], float(p[j])
        rows.append(row)
    return rows


def predict_paths(model_uri: str, paths: Iterable[str | Path], *, top_k: int = 3, batch_size: int = 32,
                  tracking_uri: str | None = None) -> pd.DataFrame:
    """Top-k predictions per image; an unreadable file gets a row with its error and no classes."""
    if top_k < 1:
        raise DataError(f"--top-k must be at least 1, got {top_k}")
    predictor = load_predictor(model_uri, tracking_uri=tracking_uri)
    files, missing = collect_images(paths)
    if not files and not missing:
        raise DataError(f"no image files in {', '.join(str(p) for p in paths)}")
    rows = [{"path": p, "error": reason} for p, reason in missing]
    for start in range(0, len(files), batch_size):
        good, arrays = [], []
        for path in files[start:start + batch_size]:
            try:
                arrays.append(_decode(path, predictor.input_config.size))
                good.append(str(path))
            except CarclfError as e:
                log.debug("%s", e)  # reported in the row; the CLI prints it
                rows.append({"path": str(path), "error": str(e)})
        if arrays:
            rows += top_k_rows(good, predictor.probabilities(arrays), predictor.classes, top_k)
    columns = ["path", "error"] + [f"{c}_{i}" for i in range(1, min(top_k, len(predictor.classes)) + 1)
                                   for c in ("class", "prob")]
    return pd.DataFrame(rows).reindex(columns=columns)


def write_csv(df: pd.DataFrame, out: str | Path) -> Path:
    """Write the predictions atomically (a temp file in the same folder, then os.replace)."""
    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        df.to_csv(tmp, index=False)
        os.chmod(tmp, 0o644)  # as an ordinary new file would be, not mkstemp's private 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def format_row(row: pd.Series, k: int) -> str:
    if isinstance(row["error"], str) and row["error"]:
        return f"{row['path']}: ERROR {row['error']}"
    shown = [f"{row[f'class_{i}']} {row[f'prob_{i}']:.3f}" for i in range(1, k + 1) if f"class_{i}" in row]
    return f"{row['path']}: " + ", ".join(shown)


def cli_predict(args) -> int:
    df = predict_paths(args.model_uri, args.paths, top_k=args.top_k, tracking_uri=getattr(args, "tracking_uri", None))
    for _, row in df.iterrows():
        print(format_row(row, args.top_k))
    if args.out:
        print(f"predictions written to {write_csv(df, args.out)}")
    failed = int((df["error"].fillna("") != "").sum())
    if failed:
        print(f"{failed} of {len(df)} inputs could not be predicted")
    return 1 if failed == len(df) else 0
