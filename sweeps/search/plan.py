"""The plan a sweep prints before its first trial: what it extracts, each family's estimated trial time, whether
its time budget holds one trial per family, and the families cheapest first (the order of their default trials).

    plan = show_plan(spec, "model10")   # prints the plan; SweepError when no family's first trial can finish
    plan.order                          # ['mobilenet_v2', 'svm_linear', 'svm_rbf']: the default trials' order

Estimates come from a small cost model, measured on this machine when the sweep starts (a few seconds):
- the data's shape from a scan (train rows after balancing, validation rows, classes), as a trial sees it;
- each backbone's forward time per image at the sweep's image size, timed on a few random images with the
  trial's threads, and its feature width;
- the machine's float32 matrix-product rate with the trial's threads (threadpoolctl), which prices each head
  by its arithmetic: a multinomial logistic regression ~LOGISTIC_PASSES passes over n x d x classes, libsvm's
  one-vs-one SVC ~SVC_WORK x 2 n^2 d over its class pairs, LinearSVC one-vs-rest LIBLINEAR_PASSES passes per
  class, a probe's epochs over its features, a network's epochs through its backbone; an SVM calibrated by
  cross-validation fits folds + 1 times, on `(folds - 1) / folds` of the data for the folds.
The constants were fitted to timings of these heads on this project's 2-core machine (bench/many_classes.py
and the issue's 196-class measurements). They are rough: an iterative solver (lbfgs, liblinear, a probe with
early stopping) stops when it converges, sooner or later than a typical run, so a trial may take a few times
more or less than its estimate. A budget is therefore refused only when not even the cheapest family's first
trial would finish in it at 1 / TOLERANCE of its estimate; a family whose first trial does not fit is warned
about, with what to change.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from carclf.config import RunConfig
from carclf.core import paths
from carclf.core.errors import CarclfError, SweepError
from carclf.data.prepare import prepare_data
from carclf.models.networks import build_backbone
from carclf.models.svm import CALIBRATION_HOLDOUT, SVM_CALIBRATION_FOLDS
from carclf.training.features import FeatureCache, feature_key, weights_id
from carclf.training.probe import feature_config, probe_feature_mode
from sweeps.search.defaults import default_config
from sweeps.search.spec import SweepSpec

log = logging.getLogger(__name__)

TOLERANCE = 3.0  # a budget is refused only when even the cheapest trial's estimate / TOLERANCE exceeds it
LOGISTIC_PASSES = 60  # lbfgs: ~20 iterations, each a loss and a gradient (two products) and line-search steps
# lbfgs's bookkeeping, beyond its arithmetic: separable data (fewer rows than features) runs to its 500 iterations;
# model10's trials (774 x 1,280 features, one thread, a loaded machine) fitted in 0.4 to 1.9 s, arithmetic 0.2 s
LOGISTIC_OVERHEAD_S = 2.0
SVC_WORK = 1.0  # libsvm: about 2 n^2 d multiply-adds over all class pairs (kernel rows, shrinking, cache misses)
LIBLINEAR_PASSES = 2000  # LinearSVC: dual coordinate descent over n x d per class, often to its 1,000-iteration cap
# A trial's own start and finish, whatever it trains: its worker, its MLflow run and logging, reading its split and
# cached features. Rough: with the 2-core machine shared (load average 30) model10's 12 logistic trials took
# 6.6 minutes 2 at a time, fits under 2 s each
TRIAL_START_S = 10.0
PROBE_STEP_S = 4e-4  # a probe's Python and optimiser overhead per batch, beyond its arithmetic
_ESTIMATES: dict[str, dict[str, float]] = {}  # sweep name -> family -> estimated seconds (for sweeps.search.defaults)


@dataclass(frozen=True)
class Shape:
    """What a family's trial trains on: rows of its train split (balanced, times feature passes), validation rows."""

    n_train: int
    n_val: int
    classes: int


@dataclass(frozen=True)
class Machine:
    """This machine's speed for one trial: float32 product rate per thread count, backbone seconds per image."""

    flops: dict[int, float]  # threads -> multiply-adds x 2 per second
    image_s: dict[tuple, float] = field(default_factory=dict)  # (backbone, features, size, threads) -> seconds
    dims: dict[tuple, int] = field(default_factory=dict)  # (backbone, features, size) -> feature width


@dataclass(frozen=True)
class FamilyCost:
    family: str
    seconds: float | None  # the first trial's estimate, its start included, extraction excluded (None: not estimated)
    what: str  # the head and the work, in words
    hint: str  # what to change to make it cheaper
    extraction: tuple | None = None  # the feature key it needs (extracted once, by the first trial needing it)


@dataclass
class Extraction:
    backbone: str
    weights: str
    features: str
    size: int
    images: int
    cached: bool
    seconds: float | None
    families: list[str] = field(default_factory=list)


@dataclass
class Plan:
    costs: dict[str, FamilyCost]
    extractions: dict[tuple, Extraction]
    budget_s: float | None
    concurrency: int
    data: list[str] = field(default_factory=list)  # one line per distinct data setting

    @property
    def order(self) -> list[str]:
        """Families by estimated first-trial time, unknown last, ties in the sweep file's order."""
        keys = list(self.costs)
        return sorted(keys, key=lambda k: (self.costs[k].seconds is None, self.first_trial_s(k) or 0.0,
                                           keys.index(k)))

    def first_trial_s(self, key: str) -> float | None:
        """The family's first trial with its features' extraction, if they are not cached yet."""
        cost = self.costs[key]
        if cost.seconds is None:
            return None
        ex = self.extractions.get(cost.extraction) if cost.extraction else None
        pending = ex is not None and not ex.cached
        return cost.seconds + ((ex.seconds or 0.0) if pending else 0.0)

    def finish_times(self) -> dict[str, float]:
        """When each family's default trial ends, run cheapest first on `concurrency` slots; a shared
        extraction is paid by the first trial needing it and waited for by the others."""
        slots = [0.0] * self.concurrency
        ready: dict[tuple, float] = {}
        out = {}
        for key in self.order:
            cost = self.costs[key]
            if cost.seconds is None:
                continue
            i = int(np.argmin(slots))
            start, extra = slots[i], 0.0
            ex = self.extractions.get(cost.extraction) if cost.extraction else None
            if ex is not None and not ex.cached:
                if cost.extraction in ready:
                    start = max(start, ready[cost.extraction])
                else:
                    extra = ex.seconds or 0.0
                    ready[cost.extraction] = start + extra
            slots[i] = out[key] = start + extra + cost.seconds
        return out

    def lines(self) -> list[str]:
        out = ["plan (rough estimates on this machine now; a trial may take a few times more or less):"]
        out += [f"  data: {line}" for line in self.data]
        for ex in self.extractions.values():
            when = "cached" if ex.cached else f"about {_duration(ex.seconds)}"
            out.append(f"  extract: {ex.backbone} ({ex.weights}, {ex.features}) at {ex.size} px, {ex.images:,} images: "
                       f"{when}; for {', '.join(ex.families)}")
        out.append("  default trials, cheapest first (start and fit; the first to need features extracts them):")
        width = max(len(k) for k in self.costs)
        for key in self.order:
            c = self.costs[key]
            out.append(f"    {key:<{width}}  {_duration(c.seconds):>9}  {c.what}")
        return out + self.budget_lines()

    def budget_lines(self) -> list[str]:
        if self.budget_s is None:
            return []
        ends = self.finish_times()
        if not ends:
            return ["  budget: no family could be estimated, so the budget is not checked"]
        late = [k for k in self.order if k in ends and ends[k] > self.budget_s]
        if not late:
            last = max(ends.values(), default=0.0)
            return [f"  budget: time_budget_s {self.budget_s:g} s holds one trial per family (all done after about "
                    f"{_duration(last)}, {self.concurrency} at a time)"]
        return [f"  budget: WARNING time_budget_s {self.budget_s:g} s may not hold {k}'s first trial: it is "
                f"estimated to end after {_duration(ends[k])} ({self.concurrency} trials at a time, cheapest "
                f"first). Raise time_budget_s to about {_round_up(ends[k])} s, or {self.costs[k].hint}"
                for k in late]

    def check_budget(self) -> None:
        """SweepError when not even the cheapest family's first trial is estimated to finish within the budget."""
        ends = self.finish_times()
        if self.budget_s is None or not ends:
            return
        if min(ends.values()) / TOLERANCE > self.budget_s:
            first = min(ends, key=ends.get)
            raise SweepError(f"time_budget_s {self.budget_s:g} s cannot hold a single trial: the cheapest family, "
                             f"{first}, is estimated at {_duration(ends[first])} ({self.costs[first].what}). "
                             f"Raise time_budget_s to about {_round_up(ends[first])} s, or {self.costs[first].hint}")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _round_up(seconds: float) -> int:
    """A budget to suggest: the estimate and half again, to two significant figures."""
    value = seconds * 1.5
    step = 10 ** max(0, int(np.log10(max(value, 1))) - 1)
    return int(-(-value // step) * step)


# ---------------------------------------------------------------------- the cost model (pure)


def svm_fit_s(svm, shape: Shape, dim: int, rate: float) -> tuple[float, str, str]:
    """(seconds, what, hint) of fitting an svm family's head (carclf.models.svm) on `shape` with `dim` features."""

    n, k = shape.n_train, shape.classes
    if svm.kernel == "logistic":
        seconds = LOGISTIC_PASSES * 2.0 * n * dim * k / rate + LOGISTIC_OVERHEAD_S
        return seconds, f"logistic regression on {n:,} x {dim} features, {k} classes, one fit", \
            "a smaller svm.C (stronger regularisation converges in fewer iterations)"
    if svm.calibration == "cv":
        folds = SVM_CALIBRATION_FOLDS
        shares = [(folds - 1) / folds] * folds + [1.0]  # one fit per fold, then one on all the rows
        how, hint = f"{len(shares)} fits, sigmoid {folds}-fold calibration", \
            f"set svm.calibration: holdout (one fit instead of {len(shares)})"
    else:
        shares = [1.0 - CALIBRATION_HOLDOUT]
        how, hint = "one fit, held-out calibration", \
            "use svm.kernel: logistic (its cost grows with classes, not with class pairs or per class)"
    if svm.linear_impl == "liblinear":
        work = sum(LIBLINEAR_PASSES * 2.0 * s * n * dim * (k if k > 2 else 1) for s in shares)
        head = "LinearSVC (one-vs-rest)"
    else:
        work = sum(SVC_WORK * 2.0 * 2.0 * (s * n) ** 2 * dim for s in shares)
        head = f"SVC {svm.kernel}"
    return work / rate, f"{head} on {n:,} x {dim} features, {k} classes: {how}", hint


def probe_fit_s(cfg: RunConfig, shape: Shape, dim: int, rate: float) -> tuple[float, str, str]:
    epochs, k = cfg.train.epochs, shape.classes
    steps = epochs * (-(-shape.n_train // cfg.train.batch_size) + -(-shape.n_val // cfg.train.batch_size))
    work = epochs * (6.0 * shape.n_train + 2.0 * shape.n_val) * dim * k
    return work / rate + steps * PROBE_STEP_S, \
        f"probe: a linear head, up to {epochs} epochs over {shape.n_train:,} x {dim} features", "fewer train.epochs"


def network_fit_s(cfg: RunConfig, shape: Shape, image_s: float) -> tuple[float, str, str]:
    """Every epoch runs the backbone forward over train and validation; `full` also backward (about 2x more)."""
    train_factor = 3.0 if cfg.model.finetune == "full" else 1.0
    seconds = cfg.train.epochs * (train_factor * shape.n_train + shape.n_val) * image_s
    return seconds, (f"{cfg.model.name} finetune {cfg.model.finetune}, up to {cfg.train.epochs} epochs over "
                     f"{shape.n_train:,} images at {cfg.data.image_size} px"), \
        "model.finetune: probe (the backbone runs once), fewer train.epochs or a smaller data.image_size"


def feature_spec(cfg: RunConfig) -> tuple | None:
    """(backbone, weights, features, size, train passes) of the features a family reads; None: it reads images."""
    if cfg.is_svm:
        return (cfg.svm.backbone, cfg.svm.backbone_weights, cfg.svm.features, cfg.data.image_size,
                cfg.svm.augment_copies)
    if cfg.model.finetune == "probe":

        return (cfg.model.name, cfg.model.weights, probe_feature_mode(cfg.model.name), cfg.data.image_size, 1)
    return None


def family_cost(key: str, cfg: RunConfig, shape: Shape, machine: Machine, threads: int) -> FamilyCost:
    """The first trial's estimated fit (extraction excluded) of family `key` configured as `cfg`."""
    feats = feature_spec(cfg)
    rate = machine.flops.get(threads) or max(machine.flops.values())
    if feats is None:
        image_s = machine.image_s.get((cfg.model.name, "gap", cfg.data.image_size, threads))
        if image_s is None:
            return FamilyCost(key, None, f"{cfg.model.name}: its backbone could not be timed", "")
        seconds, what, hint = network_fit_s(cfg, shape, image_s)
        return FamilyCost(key, TRIAL_START_S + seconds, what, hint)
    backbone, _, mode, size, passes = feats
    dim = machine.dims.get((backbone, mode, size))
    if dim is None:
        return FamilyCost(key, None, f"{feats[0]}: its backbone could not be timed", "")
    rows = Shape(shape.n_train * passes, shape.n_val, shape.classes)
    seconds, what, hint = svm_fit_s(cfg.svm, rows, dim, rate) if cfg.is_svm else probe_fit_s(cfg, rows, dim, rate)
    return FamilyCost(key, TRIAL_START_S + seconds, what, hint, extraction=feats + (cfg.data.path,))


# ---------------------------------------------------------------------- measuring (effects)


def gemm_rate(threads: int, seconds: float = 0.3) -> float:
    """Float32 matrix-product flops per second with `threads` BLAS threads, over about `seconds`."""

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(512, 1280)).astype(np.float32), rng.normal(size=(1280, 256)).astype(np.float32)
    with threadpool_limits(limits=threads):
        a @ b
        t0, reps = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
    return reps * 2.0 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - t0)


def time_backbone(name: str, features: str, size: int, threads: int, images: int = 2) -> tuple[float, int]:
    """(seconds per image, feature width) of backbone `name` at `size` px with `threads` torch threads.

    Random weights run as fast as pretrained ones and need no file."""

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        backbone = build_backbone(name, weights="none", features=features, image_size=size)
        x = torch.randn(images, 3, size, size)
        with torch.inference_mode():
            backbone(x[:1])  # the first call allocates
            t0 = time.perf_counter()
            out = backbone(x)
        return (time.perf_counter() - t0) / images, int(out.shape[1])
    finally:
        torch.set_num_threads(before)


def _threads(spec: SweepSpec, key: str) -> int:
    return max(1, int(spec.models[key].resources.cpu))


def measure_machine(spec: SweepSpec, configs: dict[str, RunConfig]) -> Machine:
    flops = {t: gemm_rate(t) for t in sorted({_threads(spec, k) for k in configs})}
    image_s, dims = {}, {}
    for key, cfg in configs.items():
        feats = feature_spec(cfg)
        name, mode = (feats[0], feats[2]) if feats else (cfg.model.name, "gap")
        probe = (name, mode, cfg.data.image_size, _threads(spec, key))
        if probe in image_s:
            continue
        try:
            image_s[probe], dims[probe[:3]] = time_backbone(*probe)
        except (CarclfError, RuntimeError, ValueError) as e:  # e.g. an image size a network cannot take
            log.warning("plan: could not time %s at %d px: %s", name, cfg.data.image_size, e)
    return Machine(flops=flops, image_s=image_s, dims=dims)


def _shapes(configs: dict[str, RunConfig]) -> tuple[dict[str, Shape], dict[str, object], list[str]]:
    """Each family's Shape (None where its data is not on this machine), its prepared data, one line per data."""

    prepared: dict[str, object] = {}
    shapes, datas, lines = {}, {}, []
    for key, cfg in configs.items():
        folder = paths.locate(cfg.data.path)
        if not folder.is_dir():
            continue
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": folder})})
        memo = repr((cfg.data, cfg.split, cfg.balance, cfg.seed))
        if memo not in prepared:
            prepared[memo] = data = prepare_data(cfg, image_size=cfg.data.image_size, decode=False)
            lines.append(f"{folder}: {len(data.classes)} classes, {len(data.train):,} train rows, "
                         f"{len(data.val):,} validation images")
        data = prepared[memo]
        shapes[key] = Shape(len(data.train), len(data.val), len(data.classes))
        datas[key] = data
    return shapes, datas, lines


def _extractions(configs, costs: dict[str, FamilyCost], datas, machine: Machine, spec) -> dict[tuple, Extraction]:
    out: dict[tuple, Extraction] = {}
    for key, cost in costs.items():
        if cost.extraction is None or key not in datas:
            continue
        backbone, weights, mode, size, passes, _ = cost.extraction
        cfg = configs[key] if configs[key].is_svm else feature_config(configs[key])
        data = datas[key]
        if cost.extraction not in out:
            root = Path(cfg.data.cache_dir) / "features" if cfg.data.cache_dir else None
            cache, sha = FeatureCache(root), weights_id(backbone, weights, seed=cfg.seed)
            cached = all(cache.contains(feature_key(cfg, data, s, weights_sha=sha)) for s in ("train", "val"))
            images = len(data.train) * passes + len(data.val)
            per_image = machine.image_s.get((backbone, mode, size, _threads(spec, key)))
            out[cost.extraction] = Extraction(backbone, weights, mode, size, images, cached,
                                              None if per_image is None else images * per_image)
        out[cost.extraction].families.append(key)
    return out


def sweep_plan(spec: SweepSpec) -> Plan:
    """The plan of `spec`'s default trials (see the module docstring): scans the data, times the backbones."""
    configs = {key: default_config(spec, key) for key in spec.models}
    shapes, datas, lines = _shapes(configs)
    machine = measure_machine(spec, configs)
    costs = {}
    for key, cfg in configs.items():
        if key in shapes:
            costs[key] = family_cost(key, cfg, shapes[key], machine, _threads(spec, key))
        else:
            costs[key] = FamilyCost(key, None, "its data is not on this machine", "")
    return Plan(costs, _extractions(configs, costs, datas, machine, spec), spec.time_budget_s,
                spec.max_concurrent_trials, lines)


def show_plan(spec: SweepSpec, name: str) -> Plan | None:
    """Print the sweep's plan, keep its order for the default trials, refuse a budget that holds no trial.

    The plan advises: when it cannot be made (a backbone that will not build here, data it cannot read), the
    sweep goes on without it, in the sweep file's order; the trials then say what is wrong.
    """
    t0 = time.perf_counter()
    try:
        plan = sweep_plan(spec)
    except (CarclfError, OSError, RuntimeError, ValueError) as e:
        log.warning("no plan for this sweep: %s", e)
        return None
    print("\n".join(plan.lines()), flush=True)
    log.info("plan estimated in %.1f s", time.perf_counter() - t0)
    remember_order(name, plan)
    plan.check_budget()
    return plan


def remember_order(name: str, plan: Plan) -> None:
    """Keep `plan`'s estimates for sweep `name`: its searcher, built next on this driver, orders its defaults so."""
    _ESTIMATES[name] = {k: plan.first_trial_s(k) for k in plan.order}


def estimated_order(name: str | None, families: list[str]) -> list[str]:
    """`families` cheapest first by the estimates show_plan kept for sweep `name`; as given without them."""
    estimates = _ESTIMATES.get(name or "", {})
    if not estimates:
        return list(families)
    return sorted(families, key=lambda k: (estimates.get(k) is None, estimates.get(k) or 0.0, families.index(k)))
