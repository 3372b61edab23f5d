"""On-disk decode cache: every image is decoded and resized once per (file content, image size).

    cache = DecodeCache(None, 224)            # under carclf.paths.cache_root()/"decode"
    array = cache.load(path, sha256)          # uint8 224x224x3 RGB; decodes and stores on a miss

Entries are `.npy` files named by the content hash, so a changed file gets a new
entry and never overwrites the old one (other runs may still use it). Every file is
written to a temporary name in the same folder and moved into place with
`os.replace`, which is atomic: a run killed mid-write leaves only a temporary file
that no reader ever opens, and several processes (or nodes on a shared file system)
filling the same entry simply replace it with identical bytes.

A small index (`files.parquet`) maps (path, size, mtime_ns) to the content hash and
to whether the file decodes, so a warm scan costs one `stat` per file instead of
reading and hashing every photo again.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from carclf import paths
from carclf.errors import DataError

log = logging.getLogger(__name__)

INDEX_NAME = "files.parquet"
_INDEX_COLUMNS = ["path", "size", "mtime_ns", "sha256", "error"]
_WHITE = (255, 255, 255)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: Path, write) -> None:
    """Call `write(fileobj)` on a temporary file next to `path`, then move it into place.

    Readers see either the old file or the complete new one, never a partial write.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA, CMYK, 16-bit ... -> RGB; transparency is flattened onto white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        # PIL's convert clips wide-range integers at 255; rescale to the full 8-bit range instead.
        values = np.asarray(img, dtype=np.float64)
        top = values.max() or 1.0
        return Image.fromarray((values * (255.0 / top)).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    try:
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy for the usual upright photo
    except Exception as e:  # malformed EXIF must not make an otherwise good photo unreadable
        log.debug("ignoring unreadable EXIF orientation: %s", e)
    return img


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Encoded image bytes -> uint8 array (image_size, image_size, 3), RGB, EXIF orientation applied.

    The image is squashed to a square, not centre-cropped: car photos are wide
    (median about 2:1), and a centre crop would cut off the front and the rear,
    which carry most of what tells two models apart.

    Raises OSError / ValueError (and PIL's errors) for unreadable or truncated data.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                # Draft mode decodes at 1/2, 1/4 or 1/8 scale while staying >= the target size.
                img.draft(None, (image_size, image_size))
            img.load()
            rgb = to_rgb(_apply_exif_orientation(img))
    resized = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.array(resized, dtype=np.uint8)  # writable: torch.from_numpy warns on read-only arrays


def read_error(exc: BaseException) -> str:
    """A one-line reason for an unreadable image."""
    text = str(exc).strip() or "unreadable"
    return f"{type(exc).__name__}: {text}"


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


class DecodeCache:
    """Decoded, resized uint8 images on disk, one `.npy` per (content hash, image size)."""

    def __init__(self, root: Path | str | None, image_size: int):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.root = Path(root) if root is not None else paths.cache_root() / "decode"
        self.image_size = int(image_size)
        # Plain string concatenation: pathlib joins cost more than the read itself on the warm path.
        self._prefix = os.path.join(str(self.root), f"{self.image_size}px", "")

    def __repr__(self) -> str:
        return f"DecodeCache(root={str(self.root)!r}, image_size={self.image_size})"

    def entry_path(self, sha256: str) -> Path:
        return Path(self._entry_str(sha256))

    def _entry_str(self, sha256: str) -> str:
        return f"{self._prefix}{sha256[:2]}/{sha256}.npy"

    def contains(self, sha256: str) -> bool:
        return os.path.isfile(self._entry_str(sha256))

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
        try:
            atomic_write_bytes(self.entry_path(sha256), lambda f: np.save(f, array, allow_pickle=False))
        except OSError as e:
            raise DataError(f"cannot write the decode cache in {self.root}: {e.strerror or e} "
                            "(set data.cache_dir or CARCLF_CACHE_DIR to a writable folder)") from e

    def _read_entry(self, sha256: str) -> np.ndarray | None:
        entry = self._entry_str(sha256)
        try:
            array = self._read_fast(entry)
            if array is None:  # another numpy's header layout, or a damaged file: the careful path
                array = np.load(entry, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as e:
            # Only a damaged disk or a foreign file can get here (writes are atomic): decode again.
            log.warning("ignoring damaged cache entry %s: %s", entry, e)
            return None
        expected = (self.image_size, self.image_size, 3)
        if array.shape != expected or array.dtype != np.uint8:
            log.warning("ignoring cache entry %s with shape %s, expected %s", entry, array.shape, expected)
            return None
        return array

    def _read_fast(self, entry: str) -> np.ndarray | None:
        """One read into a fresh buffer, checked against the exact .npy header this cache writes.

        np.load parses the header with a Python literal evaluator, which costs four
        times the read itself; the warm path is what every run and trial pays.
        """
        header = _npy_header(self.image_size)
        body = self.image_size * self.image_size * 3
        buf = np.empty(len(header) + body + 1, dtype=np.uint8)  # one spare byte detects trailing data
        with open(entry, "rb", buffering=0) as f:
            n = f.readinto(memoryview(buf))
        if n != len(header) + body or buf[:len(header)].tobytes() != header:
            return None
        return buf[len(header):n].reshape(self.image_size, self.image_size, 3)


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
