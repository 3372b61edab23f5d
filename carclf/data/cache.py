"""On-disk decode cache: every image is decoded and resized once per (file content, image size).

    cache = DecodeCache(None, 224)            # under carclf.core.paths.cache_root()/"decode"
    array = cache.load(path, sha256)          # uint8 224x224x3 RGB; decodes and stores on a miss

Entries are `.npy` files named by the content hash, so a changed file gets a new
entry and never overwrites the old one (other runs may still use it). Every file is
written to a temporary name in the same folder and moved into place with
`os.replace`, which is atomic: a run killed mid-write leaves only a temporary file
that no reader ever opens, and several processes (or nodes on a shared file system)
filling the same entry simply replace it with identical bytes.

Each entry ends in an 8-byte xxh3 checksum of its pixels (after the array, so
`np.load` still reads it). A truncated, zeroed or bit-flipped entry fails the check
and is decoded again with a warning, never served (xxh3: a few microseconds per
224 px image, where CRC-32 costs more than the whole read).

A small index (`files.parquet`) maps (path, size, mtime_ns) to the content hash and
to whether the file decodes, so a warm scan costs one `stat` per file instead of
reading and hashing every photo again.
"""

from __future__ import annotations

import functools
import io
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import xxhash

from carclf.core import paths
from carclf.core.errors import DataError
from carclf.core.files import atomic_write_bytes, sha256_bytes, write_error

# Decoding lives with the model carclf ships (car_classifier), so serving decodes exactly as training did.
from carclf.shipped.car_classifier import decode_image, read_error, to_rgb  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

INDEX_NAME = "files.parquet"
_INDEX_COLUMNS = ["path", "size", "mtime_ns", "sha256", "error"]


class FileIndex:
    """(path, size, mtime_ns) -> (sha256, decode error or ''), persisted as a small parquet file.

    A miss only costs a re-hash, so concurrent writers may lose each other's
    additions without harm; each save merges with what is on disk first.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._rows: dict[str, tuple[int, int, str, str]] = {}
        self._dirty = False
        self._loaded = False

    def _read_disk(self) -> dict[str, tuple[int, int, str, str]]:
        if not self.path.is_file():
            return {}
        try:
            # pyarrow straight to Python lists: iterating pandas' arrow-backed columns is several times slower.
            cols = pq.read_table(self.path, columns=_INDEX_COLUMNS).to_pydict()
        except Exception as e:  # a damaged index is only a lost memo: rebuild it
            log.warning("ignoring unreadable file index %s: %s", self.path, e)
            return {}
        return {p: (s, m, h, err) for p, s, m, h, err in
                zip(cols["path"], cols["size"], cols["mtime_ns"], cols["sha256"], cols["error"])}

    def load(self) -> "FileIndex":
        self._rows = self._read_disk()
        self._loaded = True
        return self

    def lookup(self, path: str, size: int, mtime_ns: int) -> tuple[str, str] | None:
        if not self._loaded:
            self.load()
        row = self._rows.get(path)
        if row is None or row[0] != size or row[1] != mtime_ns:
            return None
        return row[2], row[3]

    def record(self, path: str, size: int, mtime_ns: int, sha256: str, error: str = "") -> None:
        self._rows[path] = (size, mtime_ns, sha256, error)
        self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        merged = {**self._read_disk(), **self._rows}
        df = pd.DataFrame([(p, *row) for p, row in sorted(merged.items())], columns=_INDEX_COLUMNS)
        df = df.astype({"size": "int64", "mtime_ns": "int64"})
        try:
            atomic_write_bytes(self.path, lambda f: df.to_parquet(f, index=False))
        except OSError as e:  # only a memo: the next scan re-hashes, nothing is wrong with the data
            log.warning("cannot save the file index %s: %s", self.path, e.strerror or e)
            return
        self._rows = merged
        self._dirty = False


_CHECKSUM_BYTES = 8
# The entry layout version: `<size>px` folders of older carclf hold entries without the checksum.
_LAYOUT = "v2"


def _checksum(pixels) -> bytes:
    return xxhash.xxh3_64_digest(pixels)


def _write_entry(f, header: bytes, pixels: np.ndarray) -> None:
    f.write(header)
    f.write(pixels.data)
    f.write(_checksum(pixels.data))


class DecodeCache:
    """Decoded, resized uint8 images on disk, one checksummed `.npy` per (content hash, image size)."""

    def __init__(self, root: Path | str | None, image_size: int):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.root = Path(root) if root is not None else paths.cache_root() / "decode"
        self.image_size = int(image_size)
        # Plain string concatenation: pathlib joins cost more than the read itself on the warm path.
        self._prefix = os.path.join(str(self.root), f"{self.image_size}px-{_LAYOUT}", "")
        self._header = _npy_header(self.image_size)
        self._entry_bytes = len(self._header) + self.image_size * self.image_size * 3 + _CHECKSUM_BYTES

    def __repr__(self) -> str:
        return f"DecodeCache(root={str(self.root)!r}, image_size={self.image_size})"

    def entry_path(self, sha256: str) -> Path:
        return Path(self._entry_str(sha256))

    def _entry_str(self, sha256: str) -> str:
        return f"{self._prefix}{sha256[:2]}/{sha256}.npy"

    def contains(self, sha256: str) -> bool:
        """An entry of the right length is there (one stat: a cut-off entry counts as missing)."""
        try:
            return os.stat(self._entry_str(sha256)).st_size == self._entry_bytes
        except OSError:
            return False

    def load(self, path: str, sha256: str) -> np.ndarray:
        """The cached array for this content; on a miss, decode `path` (which must still hash to sha256)."""
        cached = self._read_entry(sha256)
        if cached is not None:
            return cached
        data = _read_file(path)
        actual = sha256_bytes(data)
        if actual != sha256:
            raise DataError(f"{path} changed since it was scanned (content hash {actual[:12]}..., "
                            f"expected {sha256[:12]}...); scan the folder again")
        return self.fill(path, data, sha256)

    def fill(self, path: str, data: bytes, sha256: str) -> np.ndarray:
        """Decode `data` (the bytes of `path`), store the entry, return the array."""
        try:
            array = decode_image(data, self.image_size)
        except Exception as e:
            raise DataError(f"cannot decode image {path}: {read_error(e)}") from e
        self.store(sha256, array)
        return array

    def store(self, sha256: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=np.uint8)
        if array.shape != (self.image_size, self.image_size, 3):
            raise ValueError(f"a {self.image_size} px cache entry must be ({self.image_size}, {self.image_size}, 3), "
                             f"got {array.shape}")
        entry = self.entry_path(sha256)
        try:
            atomic_write_bytes(entry, lambda f: _write_entry(f, self._header, array))
        except OSError as e:
            raise write_error(entry, e, "the decode cache entry",
                              "set data.cache_dir or CARCLF_CACHE_DIR to another folder") from e

    def _read_entry(self, sha256: str) -> np.ndarray | None:
        """The entry's array if it is there and intact; a damaged one is reported and left to be rebuilt."""
        entry = self._entry_str(sha256)
        body = self._entry_bytes - len(self._header) - _CHECKSUM_BYTES
        buf = np.empty(self._entry_bytes + 1, dtype=np.uint8)  # one spare byte detects trailing data
        try:
            with open(entry, "rb", buffering=0) as f:
                n = f.readinto(memoryview(buf))
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("rebuilding decode-cache entry %s: unreadable (%s)", entry, e.strerror or e)
            return None
        pixels = buf[len(self._header):len(self._header) + body]
        if n != self._entry_bytes:
            problem = f"{n} bytes, expected {self._entry_bytes}"
        elif buf[:len(self._header)].tobytes() != self._header:
            problem = "not the header this cache writes"
        elif _checksum(pixels.data) != buf[-1 - _CHECKSUM_BYTES:-1].tobytes():
            problem = "checksum mismatch"
        else:
            return pixels.reshape(self.image_size, self.image_size, 3)
        log.warning("rebuilding damaged decode-cache entry %s (%s)", entry, problem)
        return None


@functools.lru_cache(maxsize=16)
def _npy_header(image_size: int) -> bytes:
    """The bytes np.save writes before the data of a uint8 (image_size, image_size, 3) array."""
    shape = (image_size, image_size, 3)
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return out.getvalue()


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e.strerror or e}") from e
