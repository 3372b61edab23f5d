"""Features extracted ahead of the runs that read them, on every core: before a sweep's trials, before a report's retests.

    prefetch_features(configs, splits=("train", "val"))    # the runs' feature sets, each extracted once

A run that reads CNN features (an SVM, a network's `finetune: probe`) extracts them itself on a
miss, with the threads it has: one, in a Ray trial with one CPU. Done here first, each distinct
feature set is extracted once, by one process that has the machine, and the runs only read the
cache. Runs of other kinds need no features and are passed over.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable

from carclf.config import RunConfig
from carclf.core.errors import CarclfError
from carclf.core.threads import machine_threads, torch_threads
from carclf.data.prepare import prepare_data
from carclf.training.features import fill_features, key_hash, split_keys
from carclf.training.loop import select_device
from carclf.training.probe import feature_config

log = logging.getLogger(__name__)


@dataclass
class Prefetched:
    """What a prefetch did: the splits it extracted per feature set (label -> splits), and the time it took."""

    extracted: dict[str, list[str]] = field(default_factory=dict)
    cached: int = 0  # distinct feature sets whose splits were all in the cache already
    failed: dict[str, str] = field(default_factory=dict)  # label -> the error (its runs will meet it themselves)
    threads: int = 0
    seconds: float = 0.0

    @property
    def n_extracted(self) -> int:
        return sum(len(v) for v in self.extracted.values())


def feature_view(cfg: RunConfig) -> RunConfig | None:
    """`cfg` as its features are keyed: an SVM's own config, a probe's as its SVM twin sees it; else None."""
    if cfg.is_svm:
        return cfg
    if cfg.model.finetune == "probe":

        return feature_config(cfg)
    return None


def feature_label(cfg: RunConfig) -> str:
    """A feature set in words: backbone, weights, size and, where more than one pass, the copies."""
    copies = f", {cfg.svm.augment_copies} copies" if cfg.svm.augment_copies > 1 else ""
    weights = cfg.svm.backbone_weights if cfg.svm.backbone_weights in ("imagenet", "none") else "file"
    return f"{cfg.svm.backbone} ({weights}, {cfg.svm.features}) at {cfg.data.image_size} px{copies}"


def prefetch_features(configs: Iterable[RunConfig], *, splits=("train", "val"), threads: int | None = None,
                      progress: bool = True) -> Prefetched:
    """Fill the feature cache for every config that reads features, `splits` each, on `threads` threads
    (default: every core); each distinct set is extracted once, the backbone built only for a miss."""

    threads = threads or machine_threads()
    done = Prefetched(threads=threads)
    prepared: dict[str, object] = {}
    seen: set[str] = set()
    start = time.perf_counter()
    with torch_threads(threads):
        for cfg in filter(None, (feature_view(c) for c in configs)):
            data = _prepared(cfg, prepared, progress)
            identity = key_hash(split_keys(cfg, data, splits))
            if identity in seen:  # another family's trials read the very same features
                continue
            seen.add(identity)
            try:
                got = fill_features(cfg, data, device=select_device(cfg.train.device), splits=splits,
                                    progress=progress)
            except (CarclfError, RuntimeError, ValueError, OSError) as e:
                # Not fatal here: the runs that need this set extract it themselves, and fail with this error.
                log.warning("could not extract features of %s ahead: %s", feature_label(cfg), e)
                done.failed[feature_label(cfg)] = f"{type(e).__name__}: {e}"
                continue
            if got:
                done.extracted.setdefault(feature_label(cfg), []).extend(got)
            else:
                done.cached += 1
    done.seconds = time.perf_counter() - start
    return done


def _prepared(cfg: RunConfig, memo: dict, progress: bool):
    """The run's data (scan, split, balance), prepared once per distinct data setting."""

    key = json.dumps([cfg.data.model_dump(mode="json"), cfg.split.model_dump(), cfg.balance.model_dump(), cfg.seed])
    if key not in memo:
        memo[key] = prepare_data(cfg, image_size=cfg.data.image_size, progress=progress)
    return memo[key]
