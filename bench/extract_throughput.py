"""Benchmark: carclf's feature extraction against a plain torch loop, and the CPU options worth trying.

    .venv/bin/python bench/extract_throughput.py     # from the project root; 5-15 minutes on 2 busy cores

The model10 photos at 320 px (as sweeps/model10.yaml): the validation split and the first
TRAIN_IMAGES of the train split (0 here: sized for a machine whose two cores ran at a twentieth of
their speed under other load; raise it on a quiet one), ImageNet MobileNetV2 features, batch 32,
on every core. The images are decoded before the clock starts (the
decode cache, then the split arrays in memory), so every variant reads the same decoded images:

- carclf: `carclf.training.features._extract_split`, what a run or the sweep's driver runs on a miss (split
  array, batch transform, backbone under inference mode);
- bare: a plain loop over the in-memory uint8 array: to float, normalise, model, under inference mode;
- no_grad: the bare loop under torch.no_grad instead;
- channels_last, bf16 (torch.autocast on the CPU): the bare loop with either option.

Variants take turns: each split in ROUNDS parts, every variant once per part, each variant first in one
part, so a change in the machine's load hits them alike. Images per
second per variant, and its ratio to the bare loop. An option that changes the numbers is kept only if an
SVM on its features is as accurate: 5-fold cross-validated accuracy on the images above (the test split
is not read), RBF SVC (C 10, gamma 'scale') and linear SVC (C 0.01) on standardised features, against
carclf's float32 features; with the cosine similarity of each image's features to carclf's (one image
changes a 111-image accuracy by 0.009, so the features' agreement is the finer check). Target: carclf within 0.9 of the bare loop. The last line is `RESULT {json}`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "stanford_cars_model10"
SIZE, BATCH = 320, 32
TRAIN_IMAGES = 0
ROUNDS = 5  # each split in rounds, every variant once per round, a different one first each time
VARIANTS = ("carclf", "bare", "no_grad", "channels_last", "bf16")
ACCURACY_TOLERANCE = 0.005


def main() -> int:
    if not DATA.is_dir():
        print(f"model10 photos not found at {DATA}", file=sys.stderr)
        return 2
    from carclf.config import validate_run_config
    from carclf.core.threads import machine_threads
    from carclf.data.prepare import prepare_data
    from carclf.training.features import build_feature_backbone

    cfg = validate_run_config({"data": {"path": str(DATA), "image_size": SIZE, "min_images": 20},
                               "split": {"train": 0.7, "val": 0.1, "test": 0.2, "seed": 0},
                               "balance": {"mode": "none"}, "augment": {"strength": 0.0},
                               "train": {"device": "cpu", "batch_size": BATCH, "num_workers": 0},
                               "model": {"name": "svm"},
                               "svm": {"backbone": "mobilenet_v2", "backbone_weights": "imagenet", "features": "gap"}})
    threads = machine_threads()
    torch.set_num_threads(threads)
    data = first_train_rows(prepare_data(cfg, image_size=SIZE, progress=True), TRAIN_IMAGES)
    backbone = build_feature_backbone(cfg).eval()
    seconds = dict.fromkeys(VARIANTS, 0.0)
    feats: dict[str, list[np.ndarray]] = {v: [] for v in VARIANTS}
    labels, n = [], 0
    for split in ("val", "train") if TRAIN_IMAGES else ("val",):
        frame = getattr(data, split)
        for i, rows in enumerate(np.array_split(np.arange(len(frame)), ROUNDS)):
            part = replace(data, **{split: frame.iloc[rows].reset_index(drop=True)})
            images = decoded(part, split, cfg)
            for variant in VARIANTS[i % len(VARIANTS):] + VARIANTS[:i % len(VARIANTS)]:  # each leads a round
                start = time.perf_counter()
                out = run_variant(variant, backbone, cfg, part, split, images)
                seconds[variant] += time.perf_counter() - start
                feats[variant].append(out)
            labels.append(frame["label"].to_numpy()[rows])
            n += len(rows)
    return report(seconds, {v: np.concatenate(f) for v, f in feats.items()}, np.concatenate(labels), n, threads)


def first_train_rows(data, n: int):
    """`data` with only the first `n` train rows, in the manifest too (so the split array holds just those)."""
    train = data.train.iloc[:n].reset_index(drop=True)
    keep = (data.manifest["split"] != "train") | data.manifest["sha256"].isin(set(train["sha256"]))
    return replace(data, train=train, manifest=data.manifest[keep].reset_index(drop=True))


def decoded(data, split: str, cfg) -> torch.Tensor:
    """The split's decoded images as one uint8 NHWC tensor in row order, in memory (outside every timing)."""
    from carclf.data.arrays import load_split

    arr = load_split(data, split, cache_dir=cfg.data.cache_dir)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(arr.images)[arr.image_index]))


def run_variant(variant: str, backbone, cfg, data, split: str, images: torch.Tensor) -> np.ndarray:
    if variant == "carclf":
        from carclf.training.features import _extract_split

        return _extract_split(backbone, cfg, data, split, device=torch.device("cpu"), progress=False).features
    ic = backbone.input_config
    mean = torch.tensor(ic.mean).view(1, -1, 1, 1)
    std = torch.tensor(ic.std).view(1, -1, 1, 1)
    fmt = torch.channels_last if "channels_last" in variant else torch.contiguous_format
    model = backbone.to(memory_format=fmt)
    grad = torch.no_grad() if variant == "no_grad" else torch.inference_mode()
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in variant else contextlib.nullcontext()
    chunks = []
    with grad, cast:
        for start in range(0, len(images), BATCH):
            x = images[start:start + BATCH].permute(0, 3, 1, 2).float().div_(255)
            x = ((x - mean) / std).contiguous(memory_format=fmt)
            chunks.append(model(x).float().flatten(1))
    backbone.to(memory_format=torch.contiguous_format)
    return torch.cat(chunks).numpy()


def cv_accuracy(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    out = {}
    for name, svc in (("rbf", SVC(C=10.0, gamma="scale")), ("linear", SVC(kernel="linear", C=0.01))):
        out[name] = float(cross_val_score(make_pipeline(StandardScaler(), svc), x, y, cv=folds).mean())
    return out


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The lowest cosine similarity between an image's features in `a` and in `b`."""
    dot = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return round(float(dot.min()), 6)


def report(seconds: dict, feats: dict, y: np.ndarray, n: int, threads: int) -> int:
    ips = {v: n / s for v, s in seconds.items()}
    acc = {v: cv_accuracy(f, y) for v, f in feats.items()}
    base = acc["carclf"]
    rows = {}
    for v in VARIANTS:
        gap = max(abs(acc[v][k] - base[k]) for k in base)
        rows[v] = {"images_per_s": round(ips[v], 2), "vs_bare": round(ips[v] / ips["bare"], 3),
                   "cv_accuracy": {k: round(a, 4) for k, a in acc[v].items()}, "accuracy_gap": round(gap, 4),
                   "min_cosine_to_carclf": min_cosine(feats[v], feats["carclf"]),
                   "keeps_accuracy": bool(gap <= ACCURACY_TOLERANCE)}
        print(f"{v:20s} {ips[v]:7.2f} img/s  x{ips[v] / ips['bare']:.3f} of bare   cv acc "
              f"rbf {acc[v]['rbf']:.4f} linear {acc[v]['linear']:.4f}   gap {gap:.4f}")
    result = {"images": n, "train_images": TRAIN_IMAGES, "image_size": SIZE, "batch": BATCH, "threads": threads,
              "load_avg_1min_at_end": round(os.getloadavg()[0], 2), "variants": rows,
              "carclf_vs_bare": rows["carclf"]["vs_bare"], "target_carclf_vs_bare": 0.9}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
