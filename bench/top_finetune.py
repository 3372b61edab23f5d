"""Benchmark: a linear probe against `model.finetune: top` at two depths, and full fine-tuning for reference.

    nice -n 5 .venv/bin/python bench/top_finetune.py     # from the project root; 30-60 minutes on 2 loaded cores

On the model10 and model10b photos (../shared/data/...) at 320 px, ImageNet MobileNetV2, the split of
sweeps/model10.yaml (0.7 / 0.1 / 0.2, seed 0, no balancing), each a tracked run (run_experiment) into a
throw-away MLflow database and a cold cache (the decode cache is filled first, outside the timings):
- probe: the head on the pooled features (lr 1e-3, up to 60 epochs, patience 15: model10.yaml's default);
- top k=2 and top k=5: the last 2 or 5 blocks and the head on cached trunk activations, flips from the
  mirrored cache (augment.strength 1: p 0.5), AdamW lr 1e-3, up to 8 epochs, patience 3;
- full: the whole network, 1 epoch (augment.strength 0.5): its time per epoch, for reference.
The top configuration reported is the one with the better validation macro-F1 (test is the outcome).
Wall times include filling each method's own feature or activation cache.
Targets (issue 22): top beats the probe's test accuracy by 0.04 (model10) and 0.08 (model10b), within
12 minutes cache included, with epochs at least 5x faster than full fine-tuning's.
The last line is `RESULT {json}`; partial results go to stderr as each run ends.
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
SETS = {name: ROOT.parent / "shared" / "data" / f"stanford_cars_{name}" for name in ("model10", "model10b")}
BASE = {"data": {"image_size": 320, "min_images": 20}, "split": {"train": 0.7, "val": 0.1, "test": 0.2, "seed": 0},
        "balance": {"mode": "none"}, "train": {"device": "cpu", "num_workers": 0, "batch_size": 32},
        "model": {"name": "mobilenet_v2", "weights": "imagenet"}, "tracking": {"experiment": "bench-top",
                                                                               "log_model": False}}
METHODS = {
    "probe": {"model": {"finetune": "probe"}, "augment": {"strength": 0.0},
              "train": {"lr": 1e-3, "epochs": 60, "patience": 15}},
    "top2": {"model": {"finetune": "top", "top_blocks": 2}, "augment": {"strength": 1.0},
             "train": {"lr": 1e-3, "epochs": 8, "patience": 3}},
    "top5": {"model": {"finetune": "top", "top_blocks": 5}, "augment": {"strength": 1.0},
             "train": {"lr": 1e-3, "epochs": 8, "patience": 3}},
    "full": {"model": {"finetune": "full"}, "augment": {"strength": 0.5},
             "train": {"lr": 1e-3, "epochs": 1, "patience": 3}},
}


def main() -> int:
    missing = [str(p) for p in SETS.values() if not p.is_dir()]
    if missing:
        print(f"photos not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="carclf-bench-top-") as tmp:
        os.environ["CARCLF_CACHE_DIR"] = str(Path(tmp) / "cache")
        os.environ["CARCLF_PROJECT_ROOT"] = tmp
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        result = {name: one_set(path) for name, path in SETS.items()}
    print("RESULT " + json.dumps(result))
    return 0


def one_set(path: Path) -> dict:
    from carclf.config import deep_merge, validate_run_config
    from carclf.data.prepare import prepare_data
    from carclf.experiment import run_experiment

    base = deep_merge(BASE, {"data": {"path": str(path)}})
    t0 = time.perf_counter()
    prepare_data(validate_run_config(base), image_size=320)  # decoding is every method's, outside the timings
    out = {"decode_s": round(time.perf_counter() - t0, 1)}
    for method, overrides in METHODS.items():
        cfg = validate_run_config(deep_merge(base, overrides))
        start = time.perf_counter()
        res = run_experiment(cfg, log_model=False)
        wall = time.perf_counter() - start
        epochs = [r["epoch_seconds"] for r in res.history]
        out[method] = {"test_accuracy": round(res.test_metrics["accuracy"], 4),
                       "val_f1_macro": round(res.val_metrics["f1_macro"], 4), "wall_s": round(wall, 1),
                       "epoch_s": round(sum(epochs) / len(epochs), 2), "epochs": len(epochs)}
        print(f"{path.name} {method}: {json.dumps(out[method])}", file=sys.stderr, flush=True)
    chosen = max(("top2", "top5"), key=lambda m: out[m]["val_f1_macro"])
    out["top_chosen_on_val"] = chosen
    out["gain_over_probe"] = round(out[chosen]["test_accuracy"] - out["probe"]["test_accuracy"], 4)
    out["epoch_speedup_vs_full"] = round(out["full"]["epoch_s"] / out[chosen]["epoch_s"], 1)
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
