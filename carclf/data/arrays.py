"""Split arrays: one split's decoded images as one contiguous uint8 array on disk, so a run loads a split in one read.

    split = load_split(data, "train", cache_dir=cfg.data.cache_dir)   # builds <cache>/arrays/<size>px/<key>.npy once
    split.images              # (n_images, S, S, 3) uint8, memory-mapped; each unique image stored once
    split.image_index         # per row of data.train (balanced, oversampled): its image's position in `images`
    host = in_memory(split)   # the whole array in RAM, one sequential read, memoised per process

An array holds the unique images of a split of the manifest (before balancing), in the order
of their content hashes, and is named by a hash of the image size and those ordered hashes:
the same split at the same size is one file whatever the balancing, and a changed image (a new
content hash at scan time) gives a new file, so an old array is never served for new content.
Files are written to a temporary name and moved into place with os.replace; a reader checks
the header's shape and the file's exact length, so a leftover temporary file is never opened
and a truncated or foreign file is rebuilt rather than read. As the decode cache's entries, each
array has a checksum of its pixels (xxh3, in `<key>.xxh3` beside it, written first): a process
checks it once per file before using the array, so flipped bytes are rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xxhash

from carclf.core import paths
from carclf.core.errors import DataError
from carclf.core.files import atomic_path, atomic_write_bytes
from carclf.data.cache import DecodeCache

log = logging.getLogger(__name__)

# Bump when the layout of an array file changes, so old files are not read.
ARRAY_VERSION = 1
# Split arrays a process keeps in RAM for its next runs (a Ray worker runs trial after trial):
# about six model10 splits at 224 px. CARCLF_SPLIT_MEMO_MB overrides it; 0 turns the memo off.
MEMO_MB = 1024


@dataclass(frozen=True)
class SplitArray:
    """The rows of one split (balanced for train) and the array of their unique images."""

    images: np.ndarray  # (n_images, S, S, 3) uint8: a read-only memmap, or the in-memory copy
    image_index: np.ndarray  # int64 [n_rows]: position of each row's image in `images`
    labels: np.ndarray  # int64 [n_rows]
    augmented: np.ndarray  # bool [n_rows]: an oversampled copy (only the train split has them)
    path: Path  # the array file

    def __len__(self) -> int:
        return len(self.image_index)

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes)


def arrays_root(cache_dir) -> Path:
    """Where split arrays live under a configured cache folder (None: carclf.core.paths.cache_root())."""
    return (Path(cache_dir) if cache_dir is not None else paths.cache_root()) / "arrays"


def array_key(image_size: int, shas) -> str:
    """sha256 hex of the array version, the image size and the ordered content hashes."""
    h = hashlib.sha256(f"carclf-split-array-v{ARRAY_VERSION}\n{int(image_size)}\n".encode())
    for sha in shas:
        h.update(sha.encode())
        h.update(b"\n")
    return h.hexdigest()


def array_path(root: Path, image_size: int, shas) -> Path:
    return Path(root) / f"{int(image_size)}px" / f"{array_key(image_size, shas)[:40]}.npy"


def load_split(data, split: str, *, cache_dir=None) -> SplitArray:
    """The array of `split`'s unique images (built on the first call) and the rows of data.<split> into it."""
    frame: pd.DataFrame = getattr(data, split)
    images = _split_images(data.manifest, split, frame)
    shas = images["sha256"].tolist()
    cache: DecodeCache = data.cache
    path = array_path(arrays_root(cache_dir), cache.image_size, shas)
    array = _open_or_build(path, images, cache)
    position = pd.Series(np.arange(len(shas), dtype=np.int64), index=images["sha256"])
    augmented = frame["augmented"] if "augmented" in frame.columns else pd.Series(False, index=frame.index)
    memoised = _memo_get(path)
    return SplitArray(images=memoised if memoised is not None else array,
                      image_index=position.loc[frame["sha256"]].to_numpy(dtype=np.int64),
                      labels=frame["label"].to_numpy(dtype=np.int64), augmented=augmented.to_numpy(dtype=bool),
                      path=path)


def _open_or_build(path: Path, images: pd.DataFrame, cache: DecodeCache) -> np.ndarray:
    size = cache.image_size
    if images.empty:  # nothing to store (and an empty file cannot be memory-mapped)
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    array = open_array(path, len(images), size)
    if array is None:
        build_array(path, images, cache)
        array = open_array(path, len(images), size)
        if array is None:
            raise DataError(f"the split array {path} was written but cannot be read back")
    return array


def _split_images(manifest: pd.DataFrame, split: str, frame: pd.DataFrame) -> pd.DataFrame:
    """sha256 and one path per unique image of the split, sorted by sha256."""
    rows = manifest.loc[manifest["split"] == split, ["sha256", "path"]]
    missing = set(frame["sha256"]) - set(rows["sha256"])
    if missing:
        raise DataError(f"{len(missing)} rows of the {split} split are not in the manifest's {split} split")
    return rows.sort_values(["sha256", "path"]).drop_duplicates("sha256").reset_index(drop=True)


def open_array(path: Path, n_images: int, image_size: int) -> np.ndarray | None:
    """The array at `path` memory-mapped, or None if it is missing, of another shape, or not whole."""
    shape = (n_images, image_size, image_size, 3)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        size = os.stat(path).st_size
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as e:  # a truncated file fails to map: rebuild it
        log.warning("ignoring unreadable split array %s: %s", path, e)
        return None
    if not isinstance(array, np.memmap) or array.shape != shape or array.dtype != np.uint8:
        log.warning("ignoring split array %s of shape %s, expected %s", path, getattr(array, "shape", None), shape)
        return None
    if size != array.offset + array.nbytes:
        log.warning("ignoring split array %s: %d bytes, expected %d", path, size, array.offset + array.nbytes)
        return None
    return array if _checksum_matches(path, array) else None


def checksum_path(path: Path) -> Path:
    return Path(path).with_suffix(".xxh3")


_verified: set[tuple] = set()  # (path, size, mtime_ns, inode) of array files this process has checked
_verified_lock = threading.Lock()


def _checksum_matches(path: Path, array: np.memmap) -> bool:
    """Whether the array's pixels match the checksum written with them (checked once per process and file)."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    with _verified_lock:
        if key in _verified:
            return True
    try:
        expected = checksum_path(path).read_text(encoding="ascii").strip()
    except OSError:
        log.info("split array %s has no checksum (written by an older carclf): rebuilt", path)
        return False
    if xxhash.xxh3_64_hexdigest(array) != expected:
        log.warning("split array %s does not match its checksum (its bytes changed since it was written): rebuilt "
                    "from the decode cache", path)
        return False
    with _verified_lock:
        _verified.add(key)
    return True


def build_array(path: Path, images: pd.DataFrame, cache: DecodeCache) -> None:
    """Write the images (rows: sha256, path) from the decode cache into one .npy, atomically."""
    size = cache.image_size
    header = {"descr": "|u1", "fortran_order": False, "shape": (len(images), size, size, 3)}

    digest = xxhash.xxh3_64()

    def write(f) -> None:
        np.lib.format.write_array_header_1_0(f, header)
        for sha, source in zip(images["sha256"], images["path"]):
            pixels = np.ascontiguousarray(cache.load(source, sha)).tobytes()
            digest.update(pixels)
            f.write(pixels)

    log.info("writing split array %s (%d images at %d px)", path, len(images), size)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                write(f)
            # The checksum goes first: the array's name is a hash of its content, so an older file of that name
            # holds the same pixels and matches it too.
            atomic_write_bytes(checksum_path(path), lambda f: f.write(digest.hexdigest().encode("ascii")))
    except OSError as e:
        raise DataError(f"cannot write the split array {path}: {e.strerror or e} "
                        "(set data.cache_dir or CARCLF_CACHE_DIR to a writable folder with free space)") from e


# --------------------------------------------------------------------------- whole arrays in RAM, memoised


def in_memory(split: SplitArray) -> np.ndarray:
    """`split.images` as one in-memory array, read from its file in one pass; kept for this process's next runs."""
    if not isinstance(split.images, np.memmap):
        return split.images
    cached = _memo_get(split.path)
    if cached is not None:
        return cached
    array = _read_whole(split.images)
    _memo_put(split.path, array)
    return array


def _read_whole(mapped: np.memmap) -> np.ndarray:
    out = np.empty(mapped.shape, dtype=np.uint8)
    view = memoryview(out.reshape(-1))
    done = 0
    with open(mapped.filename, "rb", buffering=0) as f:
        f.seek(mapped.offset)
        while done < len(view):  # one sequential read; the kernel hands over at most ~2 GB per call
            n = f.readinto(view[done:])
            if not n:
                raise DataError(f"split array {mapped.filename} ended after {done} of {len(view)} bytes")
            done += n
    return out


_memo: OrderedDict[tuple, np.ndarray] = OrderedDict()
_memo_lock = threading.Lock()


def _memo_limit() -> int:
    return int(float(os.environ.get("CARCLF_SPLIT_MEMO_MB", MEMO_MB)) * 2**20)


def _memo_key(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return str(path), st.st_size, st.st_mtime_ns  # a replaced file is a new key


def _memo_get(path: Path) -> np.ndarray | None:
    key = _memo_key(path)
    with _memo_lock:
        array = _memo.get(key) if key is not None else None
        if array is not None:
            _memo.move_to_end(key)
        return array


def _memo_put(path: Path, array: np.ndarray) -> None:
    key, limit = _memo_key(path), _memo_limit()
    if key is None or array.nbytes > limit:
        return
    # Shared by later runs, which only read it (kept writable: torch.from_numpy warns on read-only arrays).
    with _memo_lock:
        _memo[key] = array
        while sum(a.nbytes for a in _memo.values()) > limit:
            _memo.popitem(last=False)


def clear_memo() -> None:
    """Forget the split arrays this process keeps in RAM."""
    with _memo_lock:
        _memo.clear()
    with _verified_lock:
        _verified.clear()
