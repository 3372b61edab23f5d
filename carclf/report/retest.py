"""Retest a family's chosen configuration: retrain it with several seeds on the same split, test each once.

    configs = seed_configs(cfg, 3, uri=uri, experiment="carclf", model="svm_rbf")   # seeds cfg.seed, +1, +2
    retest_family(FamilyRetest("svm_rbf", run_id, trial_id, 0.91, cfg), configs, client=client,
                  report_run_id=report_run_id, info=info)

Only `cfg.seed` changes between retests; the split stays the trial's. The first retest runs with
the trial's own seed and, on a CPU, the trial's thread count (float sums depend on it), so that it
repeats the trial. A configuration whose training does not depend on the seed (an SVM on features
no augmentation touches: `deterministic_training`) is retested once: more seeds would repeat the
same model. Every retest is an MLflow child run of the report run. Models are compared only
when every retest was tested on the same images (the hash of the test split's content and labels,
`manifest_test_hash`).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from carclf.config import RunConfig, validate_run_config
from carclf.core.errors import CarclfError, SweepError
from carclf.core.threads import torch_threads
from carclf.experiment import THREADS_TAG, run_experiment
from carclf.report.selection import ROLE_TAG, SWEEP_MODEL_TAG, SWEEP_TAG, SweepInfo, sweep_uri, trial_config
from carclf.training.features import manifest_train_key
from carclf.training.prefetch import prefetch_features

log = logging.getLogger(__name__)

REPORT_RUN_TAG = "carclf.report_run_id"
SOURCE_TRIAL_TAG = "carclf.source_trial_run_id"
REPRESENTATIVE_TAG = "carclf.representative"
TEST_HASH_TAG = "carclf.test_manifest_hash"
SEED_INDEX_TAG = "carclf.retest_seed_index"
RETEST_SEEDS_TAG = "carclf.retest_seeds"  # on every retest run: how many seeds its family was retested with
MANIFEST_ARTIFACT = "data/manifest.parquet"


@dataclass
class SeedRun:
    """One retest: a retrained configuration evaluated on the test split."""

    run_id: str | None
    seed: int
    y_true: np.ndarray
    pred: np.ndarray
    test_metrics: dict[str, float]
    val_metrics: dict[str, float]
    train_seconds: float
    infer_seconds_per_image: float
    n_params: int
    size_mb: float
    classes: list[str]
    test_hash: str = ""


@dataclass
class FamilyRetest:
    """All retests of one model family's chosen configuration."""

    model: str
    trial_run_id: str
    trial_id: str
    val_metric: float
    config: RunConfig
    runs: list[SeedRun] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    threads: int | None = None  # the CPU threads the trial trained with; its own seed's retest uses as many
    deterministic: str = ""  # why another seed would train the same model (then retested once); '' if it may not

    @property
    def representative(self) -> SeedRun | None:
        """The first successful seed (seed index 0 is the trial's own seed); never picked by test figures."""
        return self.runs[0] if self.runs else None

    @property
    def preds(self) -> np.ndarray:
        return np.stack([r.pred for r in self.runs])


def seed_configs(cfg: RunConfig, n_seeds: int, *, uri: str, experiment: str, model: str) -> list[RunConfig]:
    """The retest configs: same settings and split, seeds cfg.seed, cfg.seed+1, ..."""
    out = []
    for i in range(n_seeds):
        seed = cfg.seed + i
        tracking = cfg.tracking.model_copy(update={"uri": uri, "experiment": experiment, "log_model": True,
                                                   "run_name": f"retest-{model}-seed{seed}"})
        out.append(validate_run_config({**cfg.to_dict(), "seed": seed, "tracking": tracking.model_dump(mode="json")},
                                       "retest config"))
    return out


def manifest_test_hash(manifest: pd.DataFrame) -> str:
    """A hash of the test split's (image content, class) pairs: equal hashes mean the same test images
    with the same labels, wherever the files lie (paths are left out on purpose)."""
    test = manifest.loc[manifest["split"] == "test", ["sha256", "class"]].astype(str)
    lines = sorted(test["sha256"] + "\t" + test["class"])
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def run_manifest(client, run_id: str) -> pd.DataFrame:
    """The split manifest a run logged (run_experiment logs it at MANIFEST_ARTIFACT)."""
    with tempfile.TemporaryDirectory() as tmp:
        return pd.read_parquet(client.download_artifacts(run_id, MANIFEST_ARTIFACT, tmp))


def run_test_hash(client, run_id: str) -> str:
    """The test-split hash of the manifest a run logged."""
    return manifest_test_hash(run_manifest(client, run_id))


def _seed_run(result, test_hash: str) -> SeedRun:
    if result.y_test is None or result.pred_test is None:
        raise SweepError(f"retest run {result.run_id} has no test predictions")
    return SeedRun(run_id=result.run_id, seed=result.config.seed, y_true=np.asarray(result.y_test),
                   pred=np.asarray(result.pred_test), test_metrics=dict(result.test_metrics or {}),
                   val_metrics=dict(result.val_metrics or {}), train_seconds=float(result.train_seconds),
                   infer_seconds_per_image=float(result.infer_seconds_per_image), n_params=int(result.n_params),
                   size_mb=float(result.size_mb), classes=list(result.classes), test_hash=test_hash)


def deterministic_training(cfg: RunConfig, manifest: pd.DataFrame, seeds: Sequence[int]) -> str:
    """Why retraining `cfg` with any of `seeds` on the split of `manifest` gives the same model; '' when it may not.

    A network draws its initial weights, batch order and augmentation from the seed. scikit-learn's SVC
    (svm.linear_impl 'svc') ignores its random_state without probability=True, and the probability
    calibration cuts unshuffled folds, so the SVM is a function of its training features; those are the
    same for every seed when their cache keys agree (no augmentation touches a row, balancing draws the same
    rows, the backbone's weights come from a file). So is the logistic kernel (lbfgs draws nothing).
    LinearSVC ('liblinear') shuffles by its random_state, and svm.calibration 'holdout' holds out by it.
    """

    if not cfg.is_svm or cfg.svm.linear_impl != "svc" or cfg.svm.calibration != "cv" or len(seeds) < 2:
        return ""
    try:
        keys = [manifest_train_key(cfg.model_copy(update={"seed": s}), manifest) for s in seeds]
    except (CarclfError, OSError) as e:  # e.g. the backbone's weights file is missing: the retest will say so
        log.warning("cannot tell whether %s trains deterministically: %s", cfg.svm.backbone, e)
        return ""
    if any(k != keys[0] for k in keys[1:]):
        return ""
    return ("an SVM on features that no seed changes (no augmentation, no seeded balancing, pretrained backbone): "
            "every seed trains the same model")


def retest_trial(client, info: SweepInfo, trial: dict | pd.Series, *, seeds: int, report_run_id: str,
                 experiment: str, role: str = "retest", progress: bool = False) -> FamilyRetest:
    """Retest one trial's configuration (a row of selection.trial_runs): `seeds` seeds, or one when its
    training is deterministic; the retest runs carry `carclf.role` = `role`."""
    cfg = trial_config(client, trial["run_id"])
    family = FamilyRetest(model=trial["model"], trial_run_id=trial["run_id"], trial_id=str(trial["trial_id"]),
                          val_metric=float(trial.get(info.metric, float("nan"))), config=cfg,
                          threads=trial_threads(client, trial["run_id"]))
    family.deterministic = deterministic_training(cfg, run_manifest(client, trial["run_id"]),
                                                  [cfg.seed + i for i in range(seeds)])
    n = 1 if family.deterministic else seeds
    label = family.model if role == "retest" else f"{family.model}-{role}"
    configs = seed_configs(cfg, n, uri=sweep_uri(info), experiment=experiment, model=label)
    log.info("retesting %s%s (trial %s, %s=%.4f) with %d seed(s)%s%s", family.model,
             "" if role == "retest" else f" ({role})", family.trial_id, info.metric, family.val_metric, n,
             " (deterministic)" if family.deterministic else "",
             f" on {family.threads} CPU thread(s), as the trial" if family.threads else "")
    features_first(configs, progress=progress)
    return retest_family(family, configs, client=client, report_run_id=report_run_id, info=info, role=role,
                         progress=progress)


def features_first(configs: list[RunConfig], *, progress: bool = False) -> None:
    """The configs' features (the test split's too) extracted with every core before the retests: the first
    seed retrains on the trial's thread count (one, for a one-CPU trial), which the extraction need not share."""

    done = prefetch_features(configs, splits=("train", "val", "test"), progress=progress)
    if done.n_extracted:
        log.info("features for the retests: %d split(s) extracted in %.0f s on %d CPU thread(s)", done.n_extracted,
                 done.seconds, done.threads)


def retest_family(family: FamilyRetest, configs: list[RunConfig], *, client, report_run_id: str,
                  info: SweepInfo, role: str = "retest", progress: bool = False) -> FamilyRetest:
    """Retrain and test one family once per config; a failed seed is recorded, the others go on."""

    for i, cfg in enumerate(configs):
        tags = {ROLE_TAG: role, SWEEP_TAG: info.name, REPORT_RUN_TAG: report_run_id, SWEEP_MODEL_TAG: family.model,
                SOURCE_TRIAL_TAG: family.trial_run_id, SEED_INDEX_TAG: i}
        try:
            # the first seed is the trial's own: on the trial's thread count it reproduces the trial;
            # the other seeds are new draws and use every core
            with torch_threads(family.threads if i == 0 else None):
                result = run_experiment(cfg, parent_run_id=report_run_id, tags=tags, evaluate_test=True,
                                        log_model=True, progress=progress)
            family.runs.append(_seed_run(result, run_test_hash(client, result.run_id)))
        except (CarclfError, RuntimeError, ValueError, OSError) as e:
            log.error("retest of %s with seed %d failed: %s", family.model, cfg.seed, e)
            family.errors.append(f"seed {cfg.seed}: {type(e).__name__}: {e}")
    return family


def trial_threads(client, run_id: str) -> int | None:
    """The CPU threads a trial run trained with (its carclf.torch_threads tag), if it recorded them."""

    value = client.get_run(run_id).data.tags.get(THREADS_TAG, "")
    return int(value) if value.isdigit() else None


def check_same_test_split(families: list[FamilyRetest]) -> str:
    """The one test-split hash every retest shares; SweepError if any run was tested on other images."""
    hashes = {(f.model, r.seed): r.test_hash for f in families for r in f.runs}
    distinct = set(hashes.values())
    if len(distinct) > 1:
        shown = ", ".join(f"{m} seed {s}: {h[:12]}" for (m, s), h in sorted(hashes.items()))
        raise SweepError(f"retests were tested on different images (test manifests differ: {shown}); "
                         "models can only be compared on one test split")
    reference = next((r.y_true for f in families for r in f.runs), None)
    for f in families:
        for r in f.runs:
            if not np.array_equal(r.y_true, reference):
                raise SweepError(f"{f.model} seed {r.seed}: test labels are in a different order")
    return distinct.pop() if distinct else ""
