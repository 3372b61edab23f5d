"""Checks made once on the driver before Ray starts: what every trial needs that a sweep file cannot show.

    spec = load_sweep_spec("sweeps/quickstart.yaml")
    preflight(spec)     # SweepError naming the family, the field and the fix; nothing has started yet

- The weights of every family (a network's, an SVM's feature backbone's) can be resolved here:
  a missing file or weights package would otherwise fail every trial of that family, one by one.
- The data holds at least two classes for every family, and every SVM family's smallest class keeps
  two training images for the probability calibration (fewer calibration folds than usual are logged).
  These need the class counts, known only after a scan; the scan fills the decode cache the trials read
  (or, with `warm_cache: false`, only the file index). Data not on this machine (a Ray client) is skipped.
"""

from __future__ import annotations

import json
import logging

from carclf.config import RunConfig, validate_run_config
from carclf.core import paths
from carclf.core.errors import CarclfError, SweepError
from carclf.data.prepare import prepare_data
from carclf.models.svm import SVM_CALIBRATION_FOLDS
from carclf.models.weights import weights_sha256
from carclf.training.top import check_planned_room
from sweeps.search.params import _candidates
from sweeps.search.spec import SweepSpec

log = logging.getLogger(__name__)


def preflight(spec: SweepSpec) -> None:
    """Refuse a sweep whose trials could not run, before any trial starts (see the module docstring)."""
    configs = {key: validate_run_config(spec.base_config(key)) for key in spec.models}
    for key, cfg in configs.items():
        check_weights(key, cfg, spec)
    prepared: dict[str, object] = {}  # one scan per distinct data setting
    for key, cfg in configs.items():
        data = check_data(key, cfg, decode=spec.warm_cache, prepared=prepared)
        if data is not None and not cfg.is_svm:
            check_top_cache(key, spec, cfg, data)


def _weights(cfg: RunConfig) -> list[tuple[str, str, str]]:
    """(field, network, weights) of each network a family's trials load (an SVM: each backbone of its stack)."""
    if cfg.is_svm:
        return [("svm.backbone_weights", name, weights) for name, weights in cfg.svm.members()]
    return [("model.weights", cfg.model.name, cfg.model.weights)]


def _searched_backbones(spec: SweepSpec, key: str, cfg: RunConfig) -> list[RunConfig]:
    """The family's config with each backbone its space may pick (none unless it searches `backbone`)."""

    searched = getattr(spec.model_space(key), "backbone", None) if cfg.is_svm else None
    if searched is None:
        return []
    return [cfg.model_copy(update={"svm": cfg.svm.model_copy(update={"backbone": b})}) for b in _candidates(searched)]


def check_weights(key: str, cfg: RunConfig, spec: SweepSpec | None = None) -> None:
    """The family's weights files are there (or download), each backbone its space may pick included; hashed,
    not loaded, so VGG16's costs seconds."""

    for each in [cfg, *(_searched_backbones(spec, key, cfg) if spec is not None else [])]:
        for field, network, weights in _weights(each):
            try:
                weights_sha256(network, weights)
            except CarclfError as e:
                raise SweepError(f"models.{key}: {field} {weights!r} of {network} cannot be used, so every {key} "
                                 f"trial on it would fail: {e}") from None


def check_data(key: str, cfg: RunConfig, *, decode: bool, prepared: dict):
    """The family's data (prepared, memoised in `prepared`), or None when its folder is not on this machine."""

    folder = paths.locate(cfg.data.path)
    if folder.exists() and not folder.is_dir():
        raise SweepError(f"models.{key}: data.path {folder} is a file; it must be a folder with one sub-folder "
                         "per class")
    if not folder.is_dir():
        log.info("models.%s: data folder %s is not on this machine; its classes are checked by the trials", key,
                 folder)
        return None
    data_cfg = cfg.data.model_copy(update={"path": folder, "cache_dir": cfg.data.cache_dir and
                                            paths.locate(cfg.data.cache_dir)})
    cfg = cfg.model_copy(update={"data": data_cfg})
    memo = json.dumps([cfg.data.model_dump(mode="json"), cfg.split.model_dump(), cfg.balance.model_dump(), cfg.seed,
                       decode])
    try:
        if memo not in prepared:
            prepared[memo] = prepare_data(cfg, image_size=cfg.data.image_size, progress=decode, decode=decode)
    except CarclfError as e:
        raise SweepError(f"models.{key}: {e}") from None
    if not cfg.is_svm:
        return prepared[memo]
    counts = prepared[memo].train["class"].value_counts() * cfg.svm.augment_copies
    smallest, n = counts.idxmin(), int(counts.min())
    if n < 2:
        raise SweepError(f"models.{key}: class {smallest!r} in {folder} has a single training image; the SVM's "
                         "probability calibration needs at least 2 per class. Raise data.min_images (4 or more "
                         "keeps 2 training images with the default split), or fill small classes up with "
                         "balance.mode oversample or both")
    if n < SVM_CALIBRATION_FOLDS:
        log.warning("models.%s: class %r has %d training images, so its SVM probabilities are calibrated with %d "
                    "folds instead of %d", key, smallest, n, n, SVM_CALIBRATION_FOLDS)
    return prepared[memo]


def check_top_cache(key: str, spec: SweepSpec, cfg: RunConfig, data) -> None:
    """A `finetune: top` family's trunk activations fit the cache folder and RAM, for every top_blocks (and
    augmentation, which adds the mirrored copy) its trials may draw."""

    params = spec.model_params(key)
    finetunes = _candidates(params.get("finetune", cfg.model.finetune))
    if "top" not in finetunes:
        return
    blocks = _candidates(params.get("top_blocks", cfg.model.top_blocks))
    strength = max(_candidates(params.get("augment_strength", cfg.augment.strength)))
    located = cfg.data.model_copy(update={"cache_dir": cfg.data.cache_dir and paths.locate(cfg.data.cache_dir)})
    for k in blocks:
        trial = cfg.model_copy(update={"model": cfg.model.model_copy(update={"finetune": "top", "top_blocks": k}),
                                       "augment": cfg.augment.model_copy(update={"strength": strength}),
                                       "data": located})
        try:
            check_planned_room(trial, data)
        except CarclfError as e:
            raise SweepError(f"models.{key}: {e}") from None
