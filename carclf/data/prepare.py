"""Image data: select classes, split without leaks, balance the train split (the scan is carclf.data.scan).

    prepared = prepare_data(cfg, image_size=224)   # scan (filling the decode cache), select, split, balance
    carclf data stats PATH                         # class table, duplicates, skipped files, frequency figure
    carclf data split PATH --out manifest.parquet

Leak rules: exact duplicates (same bytes) always share one split, and only the
train split is ever resampled or augmented; validation and test hold real images.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from carclf.core.errors import DataError
from carclf.core.figures import class_frequency_figure, save_figure
from carclf.core.files import USER_FILE_MODE, atomic_write_bytes, write_error
from carclf.data.cache import DecodeCache
from carclf.data.scan import VERIFY_SIZE, ScanResult, scan_folder, scan_tree

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["path", "sha256", "class", "label", "split"]
SPLITS = ("train", "val", "test")
BALANCE_MODES = ("none", "undersample", "oversample", "both")


# --------------------------------------------------------------------------- classes


def select_classes(items: pd.DataFrame, *, classes: Sequence[str] | None = None, top_k: int | None = None,
                   min_images: int = 1) -> tuple[pd.DataFrame, list[str]]:
    """Keep the named classes (or all), drop those under `min_images` (with a warning), then keep the top K."""
    counts = items["class"].value_counts()
    if classes is not None:
        unknown = sorted(set(classes) - set(counts.index))
        if unknown:
            raise DataError(f"classes not found in the data: {', '.join(unknown)} "
                            f"(available: {', '.join(sorted(counts.index))})")
        counts = counts[counts.index.isin(list(classes))]
    too_small = sorted(c for c, n in counts.items() if n < min_images)
    if too_small:
        log.warning("classes with fewer than %d images left out: %s", min_images,
                    ", ".join(f"{c} ({counts[c]})" for c in too_small))
        counts = counts.drop(too_small)
    if top_k is not None and top_k < len(counts):
        # Most frequent first; ties broken by name so the choice never depends on listing order.
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        dropped = [c for c, _ in ranked[top_k:]]
        log.info("top_k=%d keeps %d classes; left out: %s", top_k, top_k, ", ".join(sorted(dropped)))
        counts = counts.drop(dropped)
    if counts.empty:
        raise DataError(f"the class selection is empty (classes={classes}, top_k={top_k}, min_images={min_images})")
    kept = sorted(counts.index)
    selected = items[items["class"].isin(kept)].sort_values("path", ignore_index=True)
    return selected, kept


def class_table(items: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """index (the label), class, count -- the study's first table."""
    counts = items["class"].value_counts()
    return pd.DataFrame({"index": range(len(classes)), "class": list(classes),
                         "count": [int(counts.get(c, 0)) for c in classes]})


def find_duplicates(items: pd.DataFrame) -> list[list[str]]:
    """Groups (sorted, len >= 2) of paths whose files have identical bytes."""
    groups = items.groupby("sha256")["path"].apply(sorted)
    return sorted(g for g in groups if len(g) >= 2)


def label_conflicts(items: pd.DataFrame) -> list[list[str]]:
    """Groups (sorted paths) of byte-identical files filed under more than one class: no label is right for them."""
    classes = items.groupby("sha256")["class"].nunique()
    clashing = items[items["sha256"].isin(classes.index[classes > 1])]
    return sorted(sorted(g) for g in clashing.groupby("sha256")["path"].apply(list))


def drop_label_conflicts(items: pd.DataFrame) -> pd.DataFrame:
    """The items without label conflicts; each conflict is named in a warning (path: class)."""
    conflicts = label_conflicts(items)
    if not conflicts:
        return items
    class_of = dict(zip(items["path"], items["class"]))
    for group in conflicts:
        log.warning("label conflict: the same image is filed under %d classes, left out: %s",
                    len({class_of[p] for p in group}), ", ".join(f"{_shown(p)} ({class_of[p]})" for p in group))
    dropped = {p for g in conflicts for p in g}
    return items[~items["path"].isin(dropped)].reset_index(drop=True)


def _shown(path: str) -> str:
    """A path for one line of output: control characters (a newline in a file name) escaped."""
    return path if path.isprintable() else repr(path)[1:-1]


# --------------------------------------------------------------------------- split


def _split_counts(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """(train, val, test) unit counts for one class; val and test get at least one unit when n >= 3."""
    n_val = int(np.floor(n * fractions[1] + 0.5))
    n_test = int(np.floor(n * fractions[2] + 0.5))
    if n >= 3:  # a class missing from val or test cannot be scored there
        n_val = max(1, n_val) if fractions[1] > 0 else 0
        n_test = max(1, n_test) if fractions[2] > 0 else 0
    while n - n_val - n_test < 1 and (n_val or n_test):
        if n_test >= n_val:
            n_test -= 1
        else:
            n_val -= 1
    return n - n_val - n_test, n_val, n_test


def _unit_order(sha: str, seed: int) -> str:
    # A per-seed pseudo-random rank that depends on content only, never on listing order or paths.
    return hashlib.sha256(f"{seed}:{sha}".encode()).hexdigest()


def split_items(items: pd.DataFrame, classes: Sequence[str], *, fractions=(0.7, 0.1, 0.2),
                seed: int = 0) -> pd.DataFrame:
    """Stratified train/val/test manifest; all copies of one image (same sha256) share a split."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"split fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}")
    label_of = {c: i for i, c in enumerate(classes)}
    missing = sorted(set(items["class"]) - set(label_of))
    if missing:
        raise DataError(f"items hold classes outside the selection: {', '.join(missing)}")
    # Duplicate groups are the unit of splitting; a group counts toward its most common class.
    unit_class = items.groupby("sha256")["class"].agg(lambda s: sorted(s.mode())[0])
    split_of: dict[str, str] = {}
    short = []
    for cls in classes:
        shas = sorted(unit_class.index[unit_class == cls], key=lambda h: _unit_order(h, seed))
        n_train, n_val, n_test = _split_counts(len(shas), fractions)
        if (fractions[1] > 0 and not n_val) or (fractions[2] > 0 and not n_test):
            short.append(f"{cls} ({len(shas)}: {n_train} train, {n_val} val, {n_test} test)")
        for rank, sha in enumerate(shas):
            split_of[sha] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    if short:  # such a class is never scored on validation or test: its metrics there say nothing about it
        log.warning("classes too small to reach every split (3 distinct images are needed): %s; raise "
                    "data.min_images to 3 or more to leave them out", ", ".join(short))
    manifest = items[["path", "sha256", "class"]].copy()
    manifest["label"] = manifest["class"].map(label_of).astype("int64")
    manifest["split"] = manifest["sha256"].map(split_of)
    return manifest.sort_values("path", ignore_index=True)[MANIFEST_COLUMNS]


def save_manifest(df: pd.DataFrame, path) -> Path:
    """Write the manifest as parquet, atomically (temp file + os.replace)."""
    out = Path(path)
    frame = df[MANIFEST_COLUMNS].reset_index(drop=True)
    try:
        atomic_write_bytes(out, lambda f: frame.to_parquet(f, index=False), mode=USER_FILE_MODE)
    except OSError as e:
        raise write_error(out, e, "the manifest", "pick another --out") from e
    return out


def load_manifest(path) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"manifest not found: {p}")
    try:
        df = pd.read_parquet(p)
    except Exception as e:
        raise DataError(f"manifest {p} is not readable parquet: {e}") from e
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"manifest {p} lacks columns: {', '.join(missing)}")
    bad = sorted(set(df["split"]) - set(SPLITS))
    if bad:
        raise DataError(f"manifest {p} has unknown split names: {', '.join(map(str, bad))}")
    return df[MANIFEST_COLUMNS]


def manifest_hash(df: pd.DataFrame) -> str:
    """sha256 hex of the manifest's rows in path order: equal manifests, equal hash."""
    frame = df[MANIFEST_COLUMNS].sort_values(["path", "sha256"], ignore_index=True)
    h = hashlib.sha256()
    for row in frame.itertuples(index=False):
        h.update("\t".join(str(v) for v in row).encode())
        h.update(b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------- balance


def _class_rng(seed: int, cls: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(cls.encode())])


def _balance_class(rows: pd.DataFrame, n: int, mode: str, rng: np.random.Generator) -> pd.DataFrame:
    rows = rows.assign(augmented=False)
    if len(rows) > n and mode in ("undersample", "both"):
        keep = np.sort(rng.choice(len(rows), size=n, replace=False))
        return rows.iloc[keep]
    if len(rows) < n and mode in ("oversample", "both"):
        # Fill up by cycling through a shuffled order, so each image is copied about equally often.
        need = n - len(rows)
        order = np.concatenate([rng.permutation(len(rows)) for _ in range(-(-need // len(rows)))])[:need]
        return pd.concat([rows, rows.iloc[order].assign(augmented=True)])
    return rows


def balance(train: pd.DataFrame, *, mode: str = "both", samples_per_class: int | None = None,
            seed: int = 0) -> pd.DataFrame:
    """Resample the train split to `samples_per_class` (default: median class count) per class.

    Classes above N are sampled down (undersample/both); classes below are filled up
    with copies marked `augmented=True` (oversample/both), which the train transform
    turns into fresh random variants every epoch.
    """
    if mode not in BALANCE_MODES:
        raise DataError(f"balance mode {mode!r} unknown; allowed: {', '.join(BALANCE_MODES)}")
    if "split" in train.columns and (train["split"] != "train").any():
        raise DataError("balance() takes the train split only: validation and test are never resampled")
    if train.empty:
        raise DataError("the train split is empty")
    frame = train.sort_values("path", ignore_index=True)
    counts = frame["class"].value_counts()
    n = int(samples_per_class) if samples_per_class is not None else int(np.floor(np.median(counts) + 0.5))
    if n < 1:
        raise DataError(f"samples_per_class must be >= 1, got {n}")
    parts = [_balance_class(rows, n, mode, _class_rng(seed, cls)) if mode != "none" else rows.assign(augmented=False)
             for cls, rows in frame.groupby("class", sort=True)]
    return pd.concat(parts, ignore_index=True)


def class_weights(labels, n_classes: int) -> np.ndarray:
    """Inverse-frequency weights n / (n_classes * count): the mean weight over samples is 1.

    Classes absent from `labels` get weight 1 (they never reach the loss).
    """
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.ones(n_classes, dtype=np.float64)
    present = counts > 0
    weights[present] = len(labels) / (n_classes * counts[present])
    # Rescale so sum over samples equals the sample count even when some classes are absent.
    if len(labels):
        weights[present] *= len(labels) / float((weights[labels]).sum())
    return weights


# --------------------------------------------------------------------------- dataset


class ImageDataset(Dataset):
    """(transformed image tensor CHW float, label) for each manifest row; images come from the decode cache."""

    def __init__(self, frame: pd.DataFrame, cache: DecodeCache, transform: Callable | None):
        self.paths = frame["path"].tolist()
        self.shas = frame["sha256"].tolist()
        self.labels = frame["label"].astype("int64").tolist()
        self.cache = cache
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = self.cache.load(self.paths[i], self.shas[i])
        if self.transform is not None:
            x = self.transform(image)
        else:
            x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
        return x, self.labels[i]


# --------------------------------------------------------------------------- one call for a run


@dataclass
class PreparedData:
    classes: list[str]
    manifest: pd.DataFrame  # all splits, unbalanced
    train: pd.DataFrame  # balanced, with 'augmented'
    val: pd.DataFrame
    test: pd.DataFrame
    cache: DecodeCache
    class_counts: pd.DataFrame
    duplicates: list[list[str]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    corrupt: list[tuple[str, str]] = field(default_factory=list)


def decode_cache_for(cache_dir, image_size: int) -> DecodeCache:
    """The decode cache under a configured cache folder (None: carclf.core.paths.cache_root())."""
    return DecodeCache(Path(cache_dir) / "decode" if cache_dir is not None else None, image_size)


def prepare_data(cfg, *, image_size: int, progress: bool = False, decode: bool = True) -> PreparedData:
    """Scan (filling the decode cache unless decode=False), select classes, split, balance the train split."""
    cache = decode_cache_for(cfg.data.cache_dir, image_size)
    scan = scan_folder(cfg.data.path, cache=cache if decode else None, progress=progress)
    items, classes = select_classes(scan.items, classes=cfg.data.classes, top_k=cfg.data.top_k,
                                    min_images=cfg.data.min_images)
    items = drop_label_conflicts(items)
    _need_two_classes(cfg, scan.items, classes)
    fractions = (cfg.split.train, cfg.split.val, cfg.split.test)
    manifest = split_items(items, classes, fractions=fractions, seed=cfg.split.seed)
    train = balance(manifest[manifest["split"] == "train"], mode=cfg.balance.mode,
                    samples_per_class=cfg.balance.samples_per_class, seed=cfg.seed)

    def real(split: str) -> pd.DataFrame:
        return manifest[manifest["split"] == split].reset_index(drop=True).assign(augmented=False)

    duplicates = find_duplicates(items)
    if duplicates:
        log.info("%d groups of byte-identical images; each group kept in one split", len(duplicates))
    return PreparedData(classes=classes, manifest=manifest, train=train, val=real("val"), test=real("test"),
                        cache=cache, class_counts=class_table(items, classes), duplicates=duplicates,
                        skipped=scan.skipped, corrupt=scan.corrupt)


def _need_two_classes(cfg, found: pd.DataFrame, kept: list[str]) -> None:
    """A classifier needs two classes: say so before any model is built, naming the folder and what it holds."""
    if len(kept) >= 2:
        return
    counts = found["class"].value_counts()
    held = ", ".join(f"{c} ({counts[c]})" for c in sorted(counts.index))
    raise DataError(f"{cfg.data.path}: a classifier needs at least 2 classes, but the selection keeps "
                    f"{len(kept)} ({', '.join(kept)}); class folders with readable images (count): {held}. "
                    f"Check data.path, data.classes, data.top_k and data.min_images ({cfg.data.min_images})")


# --------------------------------------------------------------------------- CLI


def _scan_and_select(args) -> tuple[ScanResult, pd.DataFrame, list[str]]:
    # Stats and split need hashes and readability, not decoded arrays: only the file index is kept.
    cache_dir = getattr(args, "cache_dir", None)
    index_dir = decode_cache_for(cache_dir, VERIFY_SIZE).root
    scan = scan_tree(args.path, cache=None, index_dir=index_dir, progress=True)
    items, classes = select_classes(scan.items, classes=args.classes, top_k=args.top_k, min_images=args.min_images)
    return scan, drop_label_conflicts(items), classes


def _print_list(title: str, entries: list[tuple[str, str]], limit: int = 20) -> None:
    print(f"\n{title}: {len(entries)}")
    for path, reason in entries[:limit]:
        print(f"  {_shown(path)}: {reason}")
    if len(entries) > limit:
        print(f"  ... and {len(entries) - limit} more")


def cli_stats(args) -> int:
    scan, items, classes = _scan_and_select(args)
    table = class_table(items, classes)
    print(table.drop(columns="index").to_string(index=False))  # the label index is for code, not for people
    print(f"\n{int(table['count'].sum())} images in {len(classes)} classes")
    duplicates = find_duplicates(items)
    print(f"\nexact duplicates: {len(duplicates)} groups ({sum(len(g) for g in duplicates)} files)")
    for group in duplicates:
        print("  " + "  ==  ".join(map(_shown, group)))
    _print_list("skipped files (hidden or not images)", scan.skipped)
    _print_list("unreadable images (left out)", scan.corrupt)

    figure = save_figure(class_frequency_figure(table), args.figure or "class_frequency.png")
    print(f"\nfigure: {figure}")
    return 0


def cli_split(args) -> int:
    scan, items, classes = _scan_and_select(args)
    manifest = split_items(items, classes, fractions=tuple(args.fractions), seed=args.seed)
    out = save_manifest(manifest, args.out)
    counts = manifest.pivot_table(index="class", columns="split", values="path", aggfunc="count", fill_value=0)
    print(counts.reindex(columns=list(SPLITS), fill_value=0).to_string())
    print(f"\n{len(manifest)} images, {len(find_duplicates(items))} duplicate groups kept together; "
          f"{len(scan.corrupt)} unreadable left out; manifest: {out}")
    return 0
