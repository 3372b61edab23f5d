"""Benchmark warm starts: best validation macro-F1 after 8 trials, fresh against warm-started, model10 photos.

    .venv/bin/python bench/warm_start.py          # from the project root, no arguments

Three sweeps of linear and RBF SVMs on ImageNet MobileNetV2 features (224 px) of the model10
photos (../shared/data/stanford_cars_model10), with the same sampler and run seeds:
  narrow  8 trials over a narrow space (the earlier sweep);
  fresh   8 trials over a wider space, from scratch;
  warm    8 trials over the same wider space, warm-started from `narrow` (its best 2 per family).
Prints each sweep's best validation macro-F1, the best so far after each trial (in the order
trials started) and that curve's mean (how good the search is at any point, not only at its end). The features are extracted once into the user's feature cache (CARCLF_CACHE_DIR)
and shared by every trial of all three sweeps; MLflow and results/ go to a temporary folder.
The last line is `RESULT {json}`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "stanford_cars_model10"
TRIALS = 8
TOP = 2

BASE = {"data": {"image_size": 224, "min_images": 20},
        # a fifth of the photos for validation (222 images): finer steps of macro-F1 than model10.yaml's tenth
        "split": {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 0},
        "balance": {"mode": "none"}, "augment": {"strength": 0.0},
        "train": {"device": "cpu", "num_workers": 0},
        "svm": {"backbone": "mobilenet_v2", "backbone_weights": "imagenet", "features": "gap"},
        "tracking": {"experiment": "bench-warm-start", "log_model": False}}
# The earlier sweep looked at a corner of the space: weak regularisation for the linear SVM, and
# an RBF SVM with sklearn's 'scale' gamma and C up to 10.
NARROW = {"svm_linear": {"kernel": "linear", "C": {"low": 1.0e-3, "high": 1.0e-1, "log": True}},
          "svm_rbf": {"kernel": "rbf", "C": {"low": 1.0, "high": 10.0, "log": True}, "gamma": "scale"}}
WIDE = {"svm_linear": {"kernel": "linear", "C": {"low": 1.0e-5, "high": 10.0, "log": True}},
        "svm_rbf": {"kernel": "rbf", "C": {"low": 1.0e-2, "high": 1.0e3, "log": True},
                    "gamma": {"low": 1.0e-5, "high": 1.0e-1, "log": True, "scale": True}}}


def sweep_file(folder: Path, name: str, spaces: dict) -> Path:
    spec = {"name": name, "description": f"bench/warm_start.py: {name}",
            "base": {**BASE, "data": {**BASE["data"], "path": str(DATA)}},
            "models": {key: {"model": "svm", "resources": {"cpu": 1}, "space": space} for key, space in spaces.items()},
            "metric": "val_f1_macro", "mode": "max", "num_samples": TRIALS, "max_concurrent_trials": 2,
            "n_startup_trials": 4, "seeds": {"sampler": 0, "run": 0}, "scheduler": None}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def best_so_far(name: str) -> list[float]:
    """The best validation macro-F1 after each trial, trials in the order they started (read from MLflow)."""
    from carclf.report.selection import resolve_sweep, sweep_client
    from sweeps.search.studies import sweep_trials

    info = resolve_sweep(name)
    out, best = [], float("-inf")
    for trial in sweep_trials(sweep_client(info), info):
        value = trial.value("val_f1_macro")
        if trial.finished_with(["val_f1_macro"]):
            best = max(best, value)
        out.append(round(best, 4) if best > float("-inf") else None)
    return out


def main() -> int:
    if not DATA.is_dir():
        print(f"real photos not found at {DATA}", file=sys.stderr)
        return 2
    from carclf.core import paths

    cache = paths.cache_root()  # resolved before the project root moves: reuse the user's caches
    result: dict = {"trials": TRIALS, "top": TOP, "image_size": BASE["data"]["image_size"], "wall_s": {}}
    with tempfile.TemporaryDirectory(prefix="carclf-bench-warm-") as tmp:
        os.environ["CARCLF_PROJECT_ROOT"] = tmp
        os.environ["CARCLF_CACHE_DIR"] = str(cache)
        from sweeps.run.runner import run_sweep

        uri = f"sqlite:///{tmp}/mlflow.db"
        runs = (("narrow", NARROW, None), ("fresh", WIDE, None), ("warm", WIDE, "narrow"))
        for name, spaces, warm in runs:
            start = time.perf_counter()
            table = run_sweep(sweep_file(Path(tmp), name, spaces), name=name, tracking_uri=uri,
                              warm_start=warm, top=TOP)
            result["wall_s"][name] = round(time.perf_counter() - start, 1)
            done = table[table["status"] == "completed"]
            result[f"{name}_best_val_f1_macro"] = round(float(done["val_f1_macro"].max()), 4)
            result[f"{name}_best_so_far"] = best_so_far(name)
            # how good the search is at any point, not only at its end: the mean of the best-so-far curve
            curve = [v for v in result[f"{name}_best_so_far"] if v is not None]
            result[f"{name}_mean_best_so_far"] = round(sum(curve) / max(len(curve), 1), 4)
            result[f"{name}_completed"] = int(len(done))
        from carclf.report.selection import resolve_sweep, sweep_client

        info = resolve_sweep("warm")
        local = sweep_client(info).download_artifacts(info.parent_run_id, "warm_start.json", tmp)
        result["warm_points"] = len(json.loads(Path(local).read_text())["points"])
    for name in ("narrow", "fresh", "warm"):
        print(f"{name:>6}: best validation macro-F1 {result[f'{name}_best_val_f1_macro']:.4f} after {TRIALS} trials; "
              f"best so far {result[f'{name}_best_so_far']}; {result['wall_s'][name]} s")
    result["warm_minus_fresh"] = round(result["warm_best_val_f1_macro"] - result["fresh_best_val_f1_macro"], 4)
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
