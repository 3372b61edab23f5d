"""Benchmark the per-trial cost of carclf's sweep machinery against bare Ray Tune, both doing no-op trials.

    .venv/bin/python bench/trial_overhead.py              # 20 trials each, 2 at a time; target <= 0.5 s/trial more
    .venv/bin/python bench/trial_overhead.py --trials 40

In one Ray session, sweeps of the same no-op work (report one validation score):
1. bare: a plain function trainable, random search, Tune's defaults;
2. bare + reuse_actors: the same with actor reuse, the setting carclf uses;
3. bare + reuse_actors + `import torch`: every real trial imports torch, and a carclf trial does
   so before its work starts (validating its RunConfig loads the model registry): the same work;
4. carclf: `run_sweep` with an experiment function that does nothing but report, so what is timed
   is the machinery: sweep file, Optuna define-by-run space, per-model resources, RunConfig per
   trial, the ASHA wrapper, the progress callback logging the running best to the parent run.
The headline difference is 4 - 3; 4 - 2 is printed too. Per-trial figures are Tuner.fit() wall
time / trials. carclf's one-off set-up (MLflow server, parent run) and results table are printed
separately. The last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import yaml

TARGET_S = 0.5


def noop_experiment(cfg, *, on_epoch=None, parent_run_id=None, tags=None, **kw):
    """Stands in for run_experiment: one epoch row to the callback, a result with fixed scores."""
    row = {"epoch": 1, "val_f1_macro": 0.5, "val_accuracy": 0.5}
    on_epoch(1, row)
    return SimpleNamespace(run_id=None, val_metrics={"f1_macro": 0.5, "accuracy": 0.5},
                           test_metrics={"f1_macro": 0.5, "accuracy": 0.5}, history=[row])


def bare_trial(config):
    from ray import tune

    tune.report({"val_f1_macro": 0.5, "val_accuracy": 0.5, "epoch": 1})


def bare_trial_torch(config):
    import torch  # noqa: F401  (what every real trial loads first)
    from ray import tune

    tune.report({"val_f1_macro": 0.5, "val_accuracy": 0.5, "epoch": 1})


def run_bare(n: int, concurrency: int, storage: Path, reuse: bool, fn=bare_trial) -> float:
    from ray import tune

    tuner = tune.Tuner(tune.with_resources(fn, {"cpu": 1}),
                       param_space={"C": tune.loguniform(0.01, 100.0)},
                       tune_config=tune.TuneConfig(num_samples=n, max_concurrent_trials=concurrency,
                                                   reuse_actors=reuse),
                       run_config=tune.RunConfig(name=f"bare-{reuse}-{fn.__name__}", storage_path=str(storage),
                                                 verbose=0))
    start = time.perf_counter()
    tuner.fit()
    return time.perf_counter() - start


def run_carclf(n: int, concurrency: int, tmp: Path) -> dict:
    from PIL import Image

    from sweeps.run.runner import run_sweep

    # The sweep's preflight reads the data (two tiny classes of real images); no-op trials read nothing.
    data = tmp / "data"
    for k, cls in enumerate(("a", "b")):
        (data / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (40 * k + 10 * i, 80, 120)).save(data / cls / f"{i}.png")
    spec = {"base": {"data": {"path": str(data), "image_size": 32, "min_images": 2},
                     "svm": {"backbone": "simple_cnn", "backbone_weights": "none"}},
            "models": {"svm": {"resources": {"cpu": 1}, "space": {"kernel": "rbf"}}},
            "num_samples": n, "max_concurrent_trials": concurrency, "n_startup_trials": 5,
            "warm_cache": False}
    path = tmp / "noop.yaml"
    path.write_text(yaml.safe_dump(spec))
    start = time.perf_counter()
    table = run_sweep(path, name="noop", tracking_uri=f"sqlite:///{tmp}/mlflow.db", experiment_fn=noop_experiment)
    total = time.perf_counter() - start
    t = table.attrs["timings"]
    assert len(table) == n and (table["status"] != "failed").all(), table
    return {"fit_s": t["fit_end"] - t["fit_start"], "setup_s": t["fit_start"], "after_s": t["end"] - t["fit_end"],
            "total_s": total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=2)
    args = ap.parse_args()
    import ray

    n, c = args.trials, args.concurrency
    with tempfile.TemporaryDirectory(prefix="carclf-bench-overhead-") as tmp_s:
        tmp = Path(tmp_s)
        os.environ["CARCLF_PROJECT_ROOT"] = str(tmp)
        os.environ["CARCLF_CACHE_DIR"] = str(tmp / "cache")
        ray.init(num_cpus=c, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            bare = run_bare(n, c, tmp / "ray", reuse=False)
            bare_reuse = run_bare(n, c, tmp / "ray", reuse=True)
            bare_torch = run_bare(n, c, tmp / "ray", reuse=True, fn=bare_trial_torch)
            carclf = run_carclf(n, c, tmp)
        finally:
            ray.shutdown()
    per = {"bare": bare / n, "bare_reuse_actors": bare_reuse / n, "bare_reuse_actors_torch": bare_torch / n,
           "carclf": carclf["fit_s"] / n}
    diff = per["carclf"] - per["bare_reuse_actors_torch"]
    diff_noop = per["carclf"] - per["bare_reuse_actors"]
    diff_default = per["carclf"] - per["bare"]
    print(f"\n{n} no-op trials, {c} at a time (Tuner.fit wall time per trial)")
    print(f"  bare Ray Tune (defaults)                  {per['bare']:.3f} s/trial")
    print(f"  bare Ray Tune (reuse_actors)              {per['bare_reuse_actors']:.3f} s/trial")
    print(f"  bare Ray Tune (reuse_actors, torch)       {per['bare_reuse_actors_torch']:.3f} s/trial")
    print(f"  carclf sweep machinery                    {per['carclf']:.3f} s/trial")
    print(f"  difference vs the same work               {diff:+.3f} s/trial (target <= {TARGET_S})")
    print(f"  difference vs a trial that imports nothing {diff_noop:+.3f} s/trial")
    print(f"  difference vs Tune defaults               {diff_default:+.3f} s/trial")
    print(f"  carclf one-off set-up {carclf['setup_s']:.1f} s (MLflow server, parent run, Ray Tune start), "
          f"results table {carclf['after_s']:.1f} s")
    result = {"trials": n, "concurrency": c, **{f"{k}_s_per_trial": round(v, 3) for k, v in per.items()},
              "overhead_s_per_trial": round(diff, 3), "overhead_vs_noop_s_per_trial": round(diff_noop, 3),
              "overhead_vs_defaults_s_per_trial": round(diff_default, 3),
              "carclf_setup_s": round(carclf["setup_s"], 1), "carclf_results_s": round(carclf["after_s"], 1),
              "target_s_per_trial": TARGET_S, "meets_target": diff <= TARGET_S}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
