"""The sweep's feature sets, extracted on the driver with every core before the first trial starts.

    prefetch_sweep_features(spec, overrides)     # sweeps.run.driver.prepare_stores calls it

Every family that reads CNN features (an SVM, a network with `finetune: probe`) names its feature
set in its config, or in searched choices (`backbone: {choices: [...]}`, and the balancing or
augmentation settings that change the train split's rows). Each combination is one set; each set's
train and validation splits are extracted here once. A range over such a setting has values no
one can list ahead: its validation split is still extracted here, its train split by the trials
that draw the values. SVM trials then find their features done and do not queue behind each other
(sweeps.run.trial.first_fill_lock).
"""

from __future__ import annotations

import itertools

from carclf.config import RunConfig, deep_merge, validate_run_config
from carclf.training.prefetch import prefetch_features
from sweeps.run.trial import _feature_key, mark_filled
from sweeps.search.params import Choice, FloatRange, IntRange
from sweeps.search.spec import SweepSpec

SPLITS = ("train", "val")  # what trials read; the test split is the report's
# The searched fields that change which features a family reads (for a probe, not the augmentation:
# its features are always taken without).
FEATURE_FIELDS = {"svm": ("backbone", "augment_strength", "samples_per_class"), "probe": ("samples_per_class",)}


def prefetch_sweep_features(spec: SweepSpec, overrides: dict) -> None:
    """Extract every feature set the sweep's trials will read, train and validation, once, with every core."""

    plans = [plan for key in spec.models if (plan := family_features(spec, key, overrides))]
    if not plans:
        return
    for splits in sorted({p[1] for p in plans}, key=len, reverse=True):
        configs = [c for cs, s, _ in plans if s == splits for c in cs]
        print(f"features before the trials: {len(configs)} configuration(s), splits {', '.join(splits)}", flush=True)
        done = prefetch_features(configs, splits=splits)
        for label, got in done.extracted.items():
            print(f"  extracted {label}: {', '.join(got)}", flush=True)
        print(f"  {done.n_extracted} split(s) extracted, {done.cached} set(s) already cached; {done.seconds:.0f} s "
              f"on {done.threads} CPU thread(s)", flush=True)
        for label, error in done.failed.items():
            print(f"  not extracted {label}: {error} (its trials will try themselves)", flush=True)
        if "train" in splits and not done.failed:
            _free_the_trials(configs)
    for _, _, note in plans:
        if note:
            print(f"  {note}", flush=True)


def family_features(spec: SweepSpec, key: str, overrides: dict) -> tuple[list[RunConfig], tuple, str] | None:
    """The configs of family `key`'s feature sets, the splits to extract ahead, and a note when a range leaves
    the train split to the trials; None for a family that reads no features."""
    kind = _reader_kind(spec, key)
    if kind is None:
        return None
    params = spec.model_params(key)
    fields = [f for f in FEATURE_FIELDS[kind] if f in params]
    ranged = [f for f in fields if isinstance(params[f], (FloatRange, IntRange))]
    values = [_values(params[f]) for f in fields if f not in ranged]
    named = [f for f in fields if f not in ranged]
    configs = [_config(spec, key, dict(zip(named, combo)), overrides) for combo in itertools.product(*values)]
    if ranged:
        return configs, ("val",), (f"models.{key}: {', '.join(ranged)} searched over a range: its trials extract "
                                   "their own train features")
    return configs, SPLITS, ""


def _reader_kind(spec: SweepSpec, key: str) -> str | None:
    """'svm', 'probe' (a network whose trials may train a probe), or None (reads no features)."""
    if not spec.is_network(key):
        return "svm"

    finetune = spec.model_params(key).get("finetune")
    base = validate_run_config(spec.base_config(key)).model.finetune
    return "probe" if "probe" in (_values(finetune) if finetune is not None else [base]) else None


def _values(p) -> list:
    return list(p.choices) if isinstance(p, Choice) else [p]


def _config(spec: SweepSpec, key: str, fixed: dict, overrides: dict) -> RunConfig:
    """A trial's config of family `key` with the feature fields `fixed` (others at the family's defaults),
    its paths as the trials get them (sweeps.run.trial.trial_config)."""
    params = {"model": key, **{f"{key}.{f}": v for f, v in fixed.items()}}
    if spec.is_network(key):
        params[f"{key}.finetune"] = "probe"
    cfg = spec.run_config(params)
    return type(cfg).model_validate(deep_merge(cfg.to_dict(), overrides))


def _free_the_trials(configs: list[RunConfig]) -> None:
    """SVM trials whose features are now cached need not wait for one another (sweeps.run.trial.first_fill_lock)."""

    for cfg in configs:
        if cfg.is_svm and cfg.data.cache_dir:
            mark_filled(cfg.data.cache_dir, _feature_key(cfg))
