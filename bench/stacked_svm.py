"""RBF SVMs on MobileNetV2, EfficientNet-Lite0 (timm, the wheel's offline file) and the two stacked, on both photo sets.

    python bench/stacked_svm.py      # from the project root; features are cached, so a second run is fast

The settings of sweeps/model10.yaml (320 px, its split, no balancing, no augmentation). Per backbone and photo
set, C is picked on validation macro-F1 from {1, 10, 100} (gamma 'scale'); the test split is the outcome.
Whether model10.yaml should offer the stack is decided on validation, on both photo sets.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from carclf.config import load_run_config
from carclf.data.prepare import prepare_data
from carclf.models.svm import fit_svm
from carclf.training.features import split_features

ROOT = Path(__file__).resolve().parents[1]
SETS = {"model10": ROOT.parent / "shared/data/stanford_cars_model10",
        "model10b": ROOT.parent / "shared/data/stanford_cars_model10b"}
BACKBONES = {"mobilenet_v2": "mobilenet_v2", "lite0": "timm/tf_efficientnet_lite0",
             "stack": ["mobilenet_v2", "timm/tf_efficientnet_lite0"]}
CS = (1.0, 10.0, 100.0)


def _config(path: Path, backbone):
    sets = ["data.image_size=320", "data.min_images=20", f"data.path={path}", "split.train=0.7", "split.val=0.1",
            "split.test=0.2", "balance.mode=none", "augment.strength=0.0", "train.num_workers=0",
            "model.name=svm", "svm.kernel=rbf", "svm.gamma=scale", f"svm.backbone={json.dumps(backbone)}"]
    return load_run_config(None, sets)


def _one(path: Path, backbone) -> dict:
    cfg = _config(path, backbone)
    data = prepare_data(cfg, image_size=cfg.data.image_size)
    t0 = time.perf_counter()
    sets = split_features(cfg, data, device=torch.device("cpu"))
    seconds = time.perf_counter() - t0
    best = None
    for c in CS:
        svm_cfg = cfg.svm.model_copy(update={"C": c})
        pipeline, _ = fit_svm(svm_cfg, sets["train"].features, sets["train"].labels, seed=cfg.seed)
        val = f1_score(sets["val"].labels, pipeline.predict(sets["val"].features), average="macro")
        if best is None or val > best[0]:
            best = (val, c, pipeline)
    val_f1, c, pipeline = best
    pred = pipeline.predict(sets["test"].features)
    return {"C": c, "val_f1": round(float(val_f1), 4),
            "test_acc": round(float(accuracy_score(sets["test"].labels, pred)), 4),
            "test_f1": round(float(f1_score(sets["test"].labels, pred, average="macro")), 4),
            "dim": int(sets["train"].features.shape[1]), "feature_s": round(seconds, 1)}


def main() -> None:
    torch.set_num_threads(2)
    out = {}
    for name, path in SETS.items():
        for label, backbone in BACKBONES.items():
            out[f"{name}/{label}"] = _one(path, backbone)
            print(name, label, out[f"{name}/{label}"], flush=True)
    out["stack_beats_both_on_val"] = all(
        out[f"{s}/stack"]["val_f1"] > max(out[f"{s}/mobilenet_v2"]["val_f1"], out[f"{s}/lite0"]["val_f1"])
        for s in SETS)
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
