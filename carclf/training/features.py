"""CNN features for the SVM: extracted in batches without gradients, cached on disk as parquet.

    sets = split_features(cfg, data, device=select_device())
    sets["train"].features.shape    # (n_train * copies, feature_dim)

A cache entry is keyed by what changes the numbers (split manifest, the rows fed to the
backbone, backbone, its weights' sha256 or random-init seed, image size, features mode and, for
the train split, balancing and the number of passes; the augmentation strength and the seed only
when augmentation touches a row), so a second SVM with another C or gamma, or a retest with
another seed of an unaugmented SVM, reads the features back without building the backbone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from carclf.config import RunConfig
from carclf.core import paths
from carclf.data.arrays import load_split
from carclf.data.inputs import DeviceBudget, SplitBatches, place, prefetch_setting
from carclf.data.prepare import balance, manifest_hash
from carclf.data.transforms import BatchEval, BatchTrainAugment
from carclf.models.networks import build_backbone, count_parameters, model_size_mb
from carclf.models.records import InputConfig
from carclf.models.weights import weights_sha256
from carclf.shipped.car_classifier import Normalised, StackedFeatures
from carclf.training.loop import loader_options, seed_everything

log = logging.getLogger(__name__)

# Bump when the extraction procedure changes, so old cache entries are not reused
# (2: train features augmented by the batched augmentation of carclf.data.transforms).
CACHE_VERSION = 2
SPLITS = ("train", "val", "test")
_META_KEY = b"carclf.features"  # where each cached parquet file keeps its metadata (a name, not a module path)


@dataclass
class FeatureSet:
    """Features of one split: rows align with `labels` and `paths`; `meta` holds timing and backbone size."""

    features: np.ndarray  # float32 [N, D]
    labels: np.ndarray  # int64 [N]
    paths: list[str]
    meta: dict = field(default_factory=dict)


def key_hash(key: dict) -> str:
    """A stable sha256 of a JSON-able key (sorted keys, so dict order does not matter)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def frame_hash(frame: pd.DataFrame) -> str:
    """sha256 of the rows that feed the backbone, in order (image content, label, augmented flag)."""
    cols = [c for c in ("sha256", "label", "augmented") if c in frame.columns]
    payload = frame[cols].astype(str).agg("|".join, axis=1).str.cat(sep="\n")
    return hashlib.sha256(payload.encode()).hexdigest()


class FeatureCache:
    """Parquet files under `<root>` (default `cache_root()/features`), one per key; writes are atomic."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else paths.cache_root() / "features"

    def path(self, key: dict) -> Path:
        return self.root / f"{key.get('split', 'x')}-{key_hash(key)[:32]}.parquet"

    def contains(self, key: dict) -> bool:
        return self.path(key).is_file()

    def load(self, key: dict) -> FeatureSet | None:
        """The cached features for `key`, or None on a miss (an unreadable entry counts as a miss)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            # One open file: metadata and rows come from the same entry even if a writer replaces it meanwhile.
            with open(path, "rb") as f:
                table = pq.read_table(f)
            dim = table.schema.field("features").type.list_size
            flat = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            meta = json.loads(table.schema.metadata[_META_KEY])
        except (OSError, KeyError, ValueError, pa.ArrowException) as e:
            log.warning("ignoring unreadable feature cache entry %s: %s", path, e)
            return None
        return FeatureSet(features=flat.astype(np.float32, copy=False).reshape(-1, dim),
                          labels=table.column("label").to_numpy().astype(np.int64),
                          paths=table.column("path").to_pylist(), meta=meta.get("meta", {}))

    def save(self, key: dict, fs: FeatureSet) -> Path:
        """Write `fs` for `key`: a temp file in the same folder, then os.replace (readers never see half)."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        feats = np.ascontiguousarray(fs.features, dtype=np.float32)
        column = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), feats.shape[1])
        table = pa.table({"path": pa.array(fs.paths, pa.string()), "label": pa.array(fs.labels, pa.int64()),
                          "features": column})
        table = table.replace_schema_metadata({_META_KEY: json.dumps({"key": key, "meta": fs.meta})})
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def extract_features(backbone: torch.nn.Module, dataset: Dataset, *, batch_size: int, device: torch.device,
                     progress: bool = False, num_workers: int | None = None, desc: str = "features") -> np.ndarray:
    """Run `backbone` over `dataset` in batches under inference mode; float32 [N, D] in dataset order."""

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, **loader_options(device, num_workers))
    return backbone_features(backbone, loader, device=device, progress=progress, desc=desc)


def backbone_features(backbone: torch.nn.Module, batches: Iterable, *, device: torch.device, progress: bool = False,
                      desc: str = "features") -> np.ndarray:
    """Run `backbone` over (images, labels) batches under inference mode; float32 [N, D] in batch order.

    Outputs stay on the device until the end: one transfer to the host. On a CPU, too, the backbone and its
    inputs are channels_last: 1.33x the images/s of contiguous tensors here (bench/extract_throughput.py, AVX-512),
    with the same SVM accuracy (its features' cosine to contiguous ones 1.0 to six places). bfloat16 autocast was
    as fast and changed the accuracy by 0.026: not used.
    """
    memory_format = torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format
    backbone = backbone.to(device, memory_format=memory_format).eval()
    chunks = []
    with torch.inference_mode():
        for images, _ in _maybe_tqdm(batches, progress, desc):
            out = backbone(images.to(device, non_blocking=True, memory_format=memory_format))
            chunks.append(out.float().flatten(1))
    if not chunks:
        return np.zeros((0, getattr(backbone, "feature_dim", 0)), dtype=np.float32)
    return torch.cat(chunks).cpu().numpy().astype(np.float32, copy=False)


def _maybe_tqdm(iterable, progress: bool, desc: str):
    if not progress:
        return iterable

    return tqdm(iterable, desc=desc, leave=False)


def weights_id(name: str, weights: str, *, seed: int) -> str:
    """What identifies the backbone's numbers: the weights file's sha256, or the seed of a random init."""

    # No file behind the name ('none', or a from-scratch network's 'imagenet'): random init, seeded by the run.
    return weights_sha256(name, weights) or f"random-seed{seed}"


def backbone_weights_id(cfg: RunConfig) -> str:
    """weights_id of the SVM's backbone; a stack's joins its members' ids in order."""
    return "+".join(weights_id(name, weights, seed=cfg.seed) for name, weights in cfg.svm.members())


def member_config(cfg: RunConfig, name: str, weights: str) -> RunConfig:
    """`cfg` as an SVM on one member of its stack sees it: that member's features have their own cache entry."""
    return cfg.model_copy(update={"svm": cfg.svm.model_copy(update={"backbone": name, "backbone_weights": weights})})


def augments_train_features(cfg: RunConfig, frame: pd.DataFrame | None = None) -> bool:
    """Whether random augmentation (hence the seed) touches the train split's features.

    Strength 0 is the eval transform. With strength > 0, a second pass (svm.augment_copies > 1) is
    augmented throughout; a single pass augments only the fill-up copies of oversampling (rows marked
    `augmented`), or every row when the frame does not mark them. Without the frame, strength > 0 counts.
    """
    if cfg.augment.strength == 0.0:
        return False
    if cfg.svm.augment_copies > 1 or frame is None or "augmented" not in frame.columns:
        return True
    return bool(frame["augmented"].astype(bool).any())


def feature_key(cfg: RunConfig, data, split: str, *, weights_sha: str) -> dict:
    """The cache key of one split's features; train adds the settings that shape its (augmented) rows.

    The seed enters only through what it changes: the rows (balancing draws them by seed: `rows`),
    a random-init backbone (`weights` is 'random-seed<seed>') and, when augmentation touches the
    features, the augmentation draws. So retests with other seeds reuse unaugmented features.
    """

    return split_key(cfg, manifest_hash(data.manifest), getattr(data, split), split, weights_sha=weights_sha)


def split_key(cfg: RunConfig, manifest_sha: str, frame: pd.DataFrame, split: str, *, weights_sha: str) -> dict:
    """feature_key from the manifest's hash and the split's rows (as prepare_data makes them)."""
    key = {"version": CACHE_VERSION, "split": split, "manifest": manifest_sha,
           "rows": frame_hash(frame), "backbone": cfg.svm.backbone, "weights": weights_sha,
           "image_size": cfg.data.image_size, "features": cfg.svm.features}
    if split == "train":
        key.update({"balance_mode": cfg.balance.mode, "samples_per_class": cfg.balance.samples_per_class,
                    "copies": cfg.svm.augment_copies})
        if augments_train_features(cfg, frame):
            key.update({"augment_strength": cfg.augment.strength, "seed": cfg.seed})
    return key


def manifest_train_key(cfg: RunConfig, manifest: pd.DataFrame) -> dict:
    """The train split's feature key from a logged split manifest: balanced by `cfg` as prepare_data does."""

    train = balance(manifest[manifest["split"] == "train"], mode=cfg.balance.mode,
                    samples_per_class=cfg.balance.samples_per_class, seed=cfg.seed)
    return split_key(cfg, manifest_hash(manifest), train, "train", weights_sha=backbone_weights_id(cfg))


def _pass_batches(placed, frame: pd.DataFrame, cfg: RunConfig, input_config, copy_index: int | None):
    """The batches of one feature pass over a split, and the frame rows they cover, in order.

    Validation and test (copy_index None): every image as the eval preset sees it. Train pass 0:
    original images through the eval maths, then the fill-up copies augmented; later passes: all
    augmented. Keeps the SVM's view of real photos clean while oversampled copies differ from their
    originals. Each pass draws its own, reproducible augmentations.
    """

    kw = {"batch_size": cfg.train.batch_size, "prefetch": prefetch_setting(cfg.train.num_workers)}
    rows = np.arange(len(frame))
    if copy_index is None:
        return [SplitBatches(placed, transform=BatchEval(input_config), **kw)], rows
    augment = BatchTrainAugment(input_config, cfg.augment.strength)
    seed = cfg.seed * 1000 + copy_index
    if copy_index > 0 or "augmented" not in frame.columns:
        return [SplitBatches(placed, transform=augment, seed=seed, **kw)], rows
    copy = frame["augmented"].to_numpy(dtype=bool)
    parts = [SplitBatches(placed, transform=BatchEval(input_config), rows=rows[~copy], **kw)]
    if copy.any():
        parts.append(SplitBatches(placed, transform=augment, rows=rows[copy], seed=seed, **kw))
    return parts, np.concatenate([rows[~copy], rows[copy]])


def _extract_split(backbone, cfg: RunConfig, data, split: str, *, device, progress: bool) -> FeatureSet:
    frame = getattr(data, split)
    # One split on the device at a time: it is released before the next split is placed.
    budget = DeviceBudget(cfg.train.device_data_mb)
    placed = place(load_split(data, split, cache_dir=cfg.data.cache_dir), device, budget, name=split)
    feats, labels, row_paths = [], [], []
    start = time.perf_counter()
    passes = list(range(cfg.svm.augment_copies)) if split == "train" else [None]
    for c in passes:
        parts, rows = _pass_batches(placed, frame, cfg, backbone.input_config, c)
        feats += [backbone_features(backbone, b, device=device, progress=progress, desc=f"{split} features")
                  for b in parts]
        labels.append(frame["label"].to_numpy(dtype=np.int64)[rows])
        row_paths.extend(frame["path"].astype(str).to_numpy()[rows].tolist())
    seconds = time.perf_counter() - start
    n = sum(len(f) for f in feats)
    threads = torch.get_num_threads()
    log.info("%s features: %d images in %.1f s on %s with %d CPU thread(s): %.1f images/s", split, n, seconds,
             device.type, threads, n / max(seconds, 1e-9))
    meta = {"seconds": seconds, "seconds_per_image": seconds / max(n, 1), "device": device.type,
            "threads": threads, "images_per_second": n / max(seconds, 1e-9), **backbone_stats(backbone)}
    return FeatureSet(np.concatenate(feats), np.concatenate(labels), row_paths, meta)


def backbone_stats(backbone) -> dict:
    """Parameter count, size in MB and feature width, kept with the cache so a hit needs no backbone."""

    return {"backbone_params": int(count_parameters(backbone)), "backbone_size_mb": float(model_size_mb(backbone)),
            "feature_dim": int(getattr(backbone, "feature_dim", 0))}


def split_features(cfg: RunConfig, data, *, device: torch.device, splits=SPLITS, progress: bool = False,
                   cache: FeatureCache | None = None) -> dict[str, FeatureSet]:
    """Features for each split: from the cache where present; the backbone is built only on a miss.
    A stack's features are its members' (each from its own cache entry) side by side."""
    if len(cfg.svm.members()) > 1:
        return _stacked_features(cfg, data, device=device, splits=splits, progress=progress, cache=cache)
    cache = cache if cache is not None else cache_for(cfg)
    keys = split_keys(cfg, data, splits)
    found = {s: cache.load(k) for s, k in keys.items()}
    missing = [s for s in splits if found[s] is None]
    found.update(_extract_missing(cfg, data, {s: keys[s] for s in missing}, cache, device=device, progress=progress))
    for s in splits:
        found[s].meta["cached"] = s not in missing
    log.info("features: %d of %d splits from cache %s", len(splits) - len(missing), len(splits), cache.root)
    return found


def fill_features(cfg: RunConfig, data, *, device: torch.device, splits=SPLITS, progress: bool = False,
                  cache: FeatureCache | None = None) -> list[str]:
    """Extract the splits whose features the cache lacks (nothing is read back); the splits it extracted.
    A stack fills each member's own entries."""
    if len(cfg.svm.members()) > 1:
        filled = [fill_features(member_config(cfg, name, weights), data, device=device, splits=splits,
                                progress=progress, cache=cache) for name, weights in cfg.svm.members()]
        return sorted({s for f in filled for s in f})
    cache = cache if cache is not None else cache_for(cfg)
    missing = {s: k for s, k in split_keys(cfg, data, splits).items() if not cache.contains(k)}
    _extract_missing(cfg, data, missing, cache, device=device, progress=progress)
    return list(missing)


def cache_for(cfg: RunConfig) -> FeatureCache:
    """The feature cache a run uses: under `data.cache_dir` when set, else the user's cache folder."""
    return FeatureCache(Path(cfg.data.cache_dir) / "features" if cfg.data.cache_dir else None)


def split_keys(cfg: RunConfig, data, splits=SPLITS) -> dict[str, dict]:
    """Each split's cache key for this run's features."""
    sha = weights_id(cfg.svm.backbone, cfg.svm.backbone_weights, seed=cfg.seed)
    return {s: feature_key(cfg, data, s, weights_sha=sha) for s in splits}


def _extract_missing(cfg: RunConfig, data, missing: dict[str, dict], cache: FeatureCache, *, device,
                     progress: bool) -> dict[str, FeatureSet]:
    """Extract and save the `missing` splits ({split: key}); the backbone is built once, and only if any."""
    if not missing:
        return {}
    backbone = build_feature_backbone(cfg)
    out = {}
    for s, key in missing.items():
        log.info("extracting %s features with %s at %d px (%d images)", s, cfg.svm.backbone, cfg.data.image_size,
                 len(getattr(data, s)))
        out[s] = _extract_split(backbone, cfg, data, s, device=device, progress=progress)
        cache.save(key, out[s])
    return out


def _stacked_features(cfg: RunConfig, data, *, device, splits, progress: bool, cache) -> dict[str, FeatureSet]:
    """Each member's features (split_features of the member alone), concatenated column-wise per split.

    Each column is standardised by the SVM's scaler (fitted on train), so no member's scale dominates.
    """
    parts = [split_features(member_config(cfg, name, weights), data, device=device, splits=splits,
                            progress=progress, cache=cache) for name, weights in cfg.svm.members()]
    out = {}
    for s in splits:
        sets = [p[s] for p in parts]
        if any(x.paths != sets[0].paths for x in sets):
            raise RuntimeError(f"the stack's members' {s} features are not of the same rows")
        meta = {key: sum(float(x.meta.get(key, 0.0)) for x in sets)
                for key in ("seconds", "seconds_per_image", "backbone_params", "backbone_size_mb", "feature_dim")}
        meta.update(device=sets[0].meta.get("device"), cached=all(x.meta.get("cached") for x in sets),
                    backbone_params=int(meta["backbone_params"]), feature_dim=int(meta["feature_dim"]))
        out[s] = FeatureSet(np.concatenate([x.features for x in sets], axis=1), sets[0].labels, sets[0].paths, meta)
    return out


def build_feature_backbone(cfg: RunConfig):
    """The run's feature backbone, as extraction builds it (also what a logged SVM model ships)."""

    if len(cfg.svm.members()) > 1:
        return _stacked_backbone(cfg)

    # Seeded so a randomly initialised backbone ('none' weights) matches its cache key.
    seed_everything(cfg.seed)
    return build_backbone(cfg.svm.backbone, weights=cfg.svm.backbone_weights, features=cfg.svm.features,
                          image_size=cfg.data.image_size)


def _stacked_backbone(cfg: RunConfig):
    """A stack's members side by side, each normalising its own input: images in [0, 1] -> the concatenation."""

    parts = [build_feature_backbone(member_config(cfg, name, weights)) for name, weights in cfg.svm.members()]
    stack = StackedFeatures([Normalised(p, p.input_config.mean, p.input_config.std) for p in parts]).eval()
    stack.feature_dim = sum(p.feature_dim for p in parts)
    stack.input_config = InputConfig(size=cfg.data.image_size, mean=(0.0,) * 3, std=(1.0,) * 3)
    shas = [p.weights_sha256 for p in parts]
    stack.weights_sha256 = None if None in shas else "+".join(shas)
    return stack
