"""Made-up trials and retested families for the report tests: no MLflow, no training.

`sample_trials()` is a sweep's trial table with a trap in it (the best test figure belongs to a
trial that is not the best on validation); `sample_family()` is a family whose seeds err at a
given rate, always predicting class i+1 for class i.
"""

import numpy as np
import pandas as pd

from carclf.config import RunConfig
from carclf.report.retest import FamilyRetest, SeedRun
from carclf.report.selection import SweepInfo


def sample_trials() -> pd.DataFrame:
    # svm: trial b is best on validation, trial a best on test -> b must be picked.
    # cnn: the best-validation trial failed, another is still running without a metric.
    return pd.DataFrame([
        {"run_id": "a", "trial_id": "t1", "model": "svm", "status": "FINISHED", "start_time": 1,
         "error": "", "val_f1_macro": 0.70, "test_f1_macro": 0.95},
        {"run_id": "b", "trial_id": "t2", "model": "svm", "status": "FINISHED", "start_time": 2,
         "error": "", "val_f1_macro": 0.80, "test_f1_macro": 0.60},
        {"run_id": "c", "trial_id": "t3", "model": "simple_cnn", "status": "FAILED", "start_time": 3,
         "error": "RuntimeError: boom", "val_f1_macro": 0.99, "test_f1_macro": 0.99},
        {"run_id": "d", "trial_id": "t4", "model": "simple_cnn", "status": "FINISHED", "start_time": 4,
         "error": "", "val_f1_macro": 0.50, "test_f1_macro": 0.90},
        {"run_id": "e", "trial_id": "t5", "model": "simple_cnn", "status": "RUNNING", "start_time": 5,
         "error": "", "val_f1_macro": np.nan, "test_f1_macro": np.nan},
        {"run_id": "f", "trial_id": "t6", "model": "alexnet", "status": "KILLED", "start_time": 6,
         "error": "", "val_f1_macro": np.nan, "test_f1_macro": np.nan},
    ])


CLASSES = ["bus", "sedan", "van"]


def sample_family(model: str, error_rate: float, seeds: int = 3, n: int = 90, val: float | None = None) -> FamilyRetest:
    """`val`: each retest's validation macro-F1 (default 1 - error_rate: validation agrees with test)."""
    y = np.arange(n) % 3
    val = 1.0 - error_rate if val is None else val
    fam = FamilyRetest(model=model, trial_run_id=f"trial-{model}", trial_id="t", val_metric=0.8,
                       config=RunConfig(model={"name": "svm" if model == "svm" else "simple_cnn"}))
    for s in range(seeds):
        rng = np.random.default_rng(100 * s + len(model))
        pred = y.copy()
        wrong = rng.random(n) < error_rate
        pred[wrong] = (y[wrong] + 1) % 3
        fam.runs.append(SeedRun(run_id=f"{model}-{s}", seed=s, y_true=y, pred=pred, test_metrics={},
                                val_metrics={"f1_macro": val}, train_seconds=2.0 + s, infer_seconds_per_image=0.001,
                                n_params=1000, size_mb=0.5, classes=CLASSES, test_hash="h"))
    return fam


def sample_info(tmp_path):
    return SweepInfo("quick", tmp_path, "parent", "carclf", "sqlite:///x.db", "val_f1_macro", "max")
