"""Rank feature backbones before training on them: LogME on each one's train-split features.

    carclf rank demo_data --backbones mobilenet_v2,simple_cnn --image-size 96
    scores = rank_backbones(cfg, [Candidate("mobilenet_v2"), Candidate("mobilenet_v2", weights="none")])

A candidate is any name `svm.backbone` accepts (and its weights). Its features come from the same
data selection, split and balancing as a run of `cfg` and through the same feature cache
(carclf.training.features), so ranking extracts each backbone once and the SVMs trained afterwards read the
features back. The score (carclf.training.logme) reads the train split only: choosing by it is choosing
without the validation or test images.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from carclf.config import RunConfig, deep_merge, load_run_config, validate_run_config
from carclf.core.console import fit_table
from carclf.core.errors import ConfigError
from carclf.data.prepare import prepare_data
from carclf.models.registry import min_image_size
from carclf.training.features import split_features, weights_id
from carclf.training.logme import logme
from carclf.training.loop import select_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """A backbone to score: a name `svm.backbone` accepts, with its weights (None: the config's)."""

    backbone: Any  # a name, or whatever else svm.backbone accepts (stacked features: a list of names)
    weights: Any = None  # a name or file; a stack's: one for all members or one per member

    @property
    def label(self) -> str:
        name = "+".join(map(str, self.backbone)) if isinstance(self.backbone, (list, tuple)) else str(self.backbone)
        return name if self.weights is None else f"{name} ({weights_label(self.weights)})"


def weights_label(weights) -> str:
    """'imagenet', 'none' or a weights file's name (its folder differs per machine); a stack's, joined by '+'."""

    if isinstance(weights, (list, tuple)):
        return "+".join(weights_label(w) for w in weights)
    return weights if weights in ("imagenet", "none") else Path(weights).name


@dataclass
class BackboneScore:
    """One candidate's LogME score and what it cost."""

    backbone: str  # the candidate's label
    logme: float
    n_train: int  # feature rows scored (the balanced train split)
    feature_dim: int
    feature_seconds: float  # this call's time to have the features: extraction, or reading the cache
    extraction_seconds: float  # what extracting them took, when it ran (kept in the cache entry)
    score_seconds: float
    cached: bool  # the features came from the cache


def candidate_config(cfg: RunConfig, candidate: Candidate) -> RunConfig:
    """`cfg` as an SVM run on the candidate's features (validated: an unknown name fails here, naming it)."""
    svm: dict[str, Any] = {"backbone": candidate.backbone}
    if candidate.weights is not None:
        svm["backbone_weights"] = candidate.weights
    # finetune 'head': a network's 'probe' setting in `cfg` means nothing for an SVM (and would be checked as one)
    data = deep_merge(cfg.to_dict(), {"model": {"name": "svm", "finetune": "head"}, "svm": svm})
    return validate_run_config(data, f"backbone {candidate.label}")


def score_features(cfg: RunConfig, data, *, device, label: str | None = None, progress: bool = False
                   ) -> BackboneScore:
    """LogME of `cfg`'s backbone on the train split of `data`, its features read from (or written to) the cache."""

    t0 = time.perf_counter()
    train = split_features(cfg, data, device=device, splits=("train",), progress=progress)["train"]
    feature_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    score = logme(train.features, train.labels)
    return BackboneScore(backbone=label or str(cfg.svm.backbone), logme=score, n_train=len(train.labels),
                         feature_dim=train.features.shape[1], feature_seconds=feature_seconds, extraction_seconds=float(train.meta.get("seconds", 0.0)),
                         score_seconds=time.perf_counter() - t0, cached=bool(train.meta.get("cached")))


def rank_backbones(cfg: RunConfig, candidates: Sequence[Candidate], *, data=None, progress: bool = False
                   ) -> list[BackboneScore]:
    """Each candidate scored on `cfg`'s data (every name checked before any work), best first."""

    configs = [(c, candidate_config(cfg, c)) for c in candidates]
    for _, ccfg in configs:
        check_candidate(ccfg)
    if data is None:
        data = prepare_data(cfg, image_size=cfg.data.image_size, progress=progress)
    device = select_device(cfg.train.device)
    scores = []
    for c, ccfg in configs:
        log.info("scoring backbone %s", c.label)
        scores.append(score_features(ccfg, data, device=device, label=c.label, progress=progress))
    return sorted(scores, key=lambda s: s.logme, reverse=True)


def check_candidate(cfg: RunConfig) -> None:
    """The backbone's weights are there and the images are large enough for it: said before any backbone runs."""

    for name, weights in _members(cfg):
        weights_id(name, weights, seed=cfg.seed)  # a missing file raises, naming it and where it goes
        need = min_image_size(name)
        if cfg.data.image_size < need:
            raise ConfigError(f"backbone {name}: image size {cfg.data.image_size} is below its minimum of {need} px; "
                              f"pass --image-size {need} or more")


def _members(cfg: RunConfig) -> list[tuple[str, str]]:
    """(backbone, weights) of each network the SVM reads: a stack of backbones lists each of its members."""
    members = getattr(cfg.svm, "members", None)
    return members() if callable(members) else [(cfg.svm.backbone, cfg.svm.backbone_weights)]


def scores_table(scores: Sequence[BackboneScore]) -> pd.DataFrame:
    """One row per candidate, best first, with the rank."""
    frame = pd.DataFrame([asdict(s) for s in scores])
    if frame.empty:
        return frame
    frame.insert(0, "rank", range(1, len(frame) + 1))
    return frame


def parse_backbones(text: str) -> list[str]:
    """'a,b, c' -> ['a', 'b', 'c'] (empty entries refused)."""

    names = [n.strip() for n in text.split(",")]
    if not names or any(not n for n in names):
        raise ConfigError(f"--backbones {text!r}: expected comma-separated backbone names, e.g. mobilenet_v2,resnet18")
    if len(set(names)) != len(names):
        raise ConfigError(f"--backbones {text!r}: a backbone is named twice")
    return names


def cli_rank(args) -> int:
    """`carclf rank DATA --backbones A,B,C [--image-size N] [--config FILE] [--set KEY=VALUE]`: the scores, best first."""

    overrides = [f"data.path={args.data}", *args.overrides]
    if args.image_size is not None:
        overrides.append(f"data.image_size={args.image_size}")
    cfg = load_run_config(args.config, overrides)
    candidates = [Candidate(name) for name in parse_backbones(args.backbones)]
    scores = rank_backbones(cfg, candidates, progress=True)
    shown = scores_table(scores).rename(columns={"feature_seconds": "features s", "extraction_seconds": "extraction s",
                                                 "score_seconds": "score s", "n_train": "n", "feature_dim": "dim"})
    print(f"LogME on the train split of {cfg.data.path} ({cfg.data.image_size} px, weights "
          f"{weights_label(cfg.svm.backbone_weights)}); higher transfers better")
    print(fit_table(shown, optional=["extraction s", "cached", "dim", "n"]))
    return 0
