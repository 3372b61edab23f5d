"""Scanning an ImageFolder tree: class folders, hidden and non-image files, links, unreadable images.

    scan = scan_folder("photos/", cache=DecodeCache(None, 224))   # ScanResult: items, skipped, corrupt

Class = top-level folder name. Every candidate is read, hashed and decoded once (into the decode
cache when one is given, else at a tiny size just to find truncated files); unchanged files are
known from the file index by path, size and mtime. Links are followed once per real folder: a
link back up is a loop, named and not followed, and a real file counts once.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from carclf.core.errors import DataError
from carclf.core.files import sha256_bytes
from carclf.data.cache import INDEX_NAME, DecodeCache, FileIndex, decode_image, read_error

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VERIFY_SIZE = 32  # without a decode cache, images are still fully decoded (small) to catch truncation


@dataclass(frozen=True)
class ScanResult:
    items: pd.DataFrame  # path (absolute str), class, sha256 -- readable images only, sorted by path
    skipped: list[tuple[str, str]]  # (path, reason): hidden or non-image files
    corrupt: list[tuple[str, str]]  # (path, reason): unreadable, empty or truncated images


# --------------------------------------------------------------------------- scanning


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


@dataclass
class _Walk:
    """What a scan has reached so far, by real path: links are followed, but nothing is read twice.

    Rules: a folder is entered once (a link back up is a loop: warned about and not followed); a real
    file is counted once, under the first class that reaches it in sorted order (a second path to it is
    skipped with a warning naming both); a link into another class's folder is not followed, so that
    class's images keep their label.
    """

    roots: dict[str, str]  # real class folder -> class
    dirs: dict[str, str] = field(default_factory=dict)  # real folder -> the path it was scanned as
    files: dict[str, str] = field(default_factory=dict)  # real file -> the path it was counted as
    candidates: list[tuple[str, str]] = field(default_factory=list)  # (path, class)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def owner(self, real: str) -> str | None:
        """The class whose folder holds `real` (the innermost one), None outside every class folder."""
        best = None
        for root, cls in self.roots.items():
            if (real == root or real.startswith(root + os.sep)) and (best is None or len(root) > len(best[0])):
                best = (root, cls)
        return best[1] if best else None

    def skip(self, path: str, reason: str, warn: bool = False) -> None:
        self.skipped.append((path, reason))
        if warn:
            log.warning("%s: %s", path, reason)


def _list_files(root: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(path, class) candidates with an image extension, and (path, reason) skipped entries."""
    walk = _Walk(roots={})
    folders = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if _is_hidden(entry.name):
            walk.skip(entry.path, "hidden")
        elif not entry.is_dir():
            walk.skip(entry.path, "not inside a class folder")
        else:
            real = os.path.realpath(entry.path)
            if real in walk.roots:
                walk.skip(entry.path, f"the same folder as class {walk.roots[real]!r} (a link); left out", warn=True)
            else:
                walk.roots[real] = entry.name
                folders.append((entry.path, real, entry.name))
    for path, real, cls in folders:
        _walk_class(path, real, cls, walk)
    return walk.candidates, walk.skipped


def _walk_class(path: str, real: str, cls: str, walk: _Walk) -> None:
    """Depth first, in name order; `real` is the real path of folder `path`."""
    walk.dirs[real] = path
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as e:
        walk.skip(path, f"unreadable folder ({e.strerror or e})", warn=True)
        return
    subfolders = []
    for entry in entries:
        if _is_hidden(entry.name):
            walk.skip(entry.path, "hidden")
            continue
        # Only a link can lead elsewhere: a plain entry's real path is its folder's, plus its name.
        linked = entry.is_symlink()
        target = os.path.realpath(entry.path) if linked else os.path.join(real, entry.name)
        if entry.is_dir():
            subfolders.append((entry.path, target, linked))
        elif os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
            walk.skip(entry.path, "not an image (extension)")
        else:
            _add_file(entry.path, target, linked, cls, walk)
    for sub, target, linked in subfolders:
        reason = _refused_folder(real, target, linked, cls, walk)
        if reason:
            walk.skip(sub, reason, warn=True)
        else:
            _walk_class(sub, target, cls, walk)


def _add_file(path: str, real: str, linked: bool, cls: str, walk: _Walk) -> None:
    first, owner = walk.files.get(real), walk.owner(real) if linked else None
    if first is not None:
        walk.skip(path, f"the same file as {first} (a link); counted once, there", warn=True)
    elif owner is not None and owner != cls:
        walk.skip(path, f"a link to an image of class {owner!r}; it keeps that label", warn=True)
    else:
        walk.files[real] = path
        walk.candidates.append((path, cls))


def _refused_folder(parent_real: str, real: str, linked: bool, cls: str, walk: _Walk) -> str | None:
    """Why the folder at real path `real` (inside the folder at `parent_real`) is not entered, or None."""
    if parent_real == real or parent_real.startswith(real + os.sep):  # an ancestor: the data root, or higher
        return f"a symlink loop back to {walk.dirs.get(real, real)}; not followed"
    if real in walk.dirs:
        return f"the same folder as {walk.dirs[real]} (a link); scanned once, there"
    owner = walk.owner(real) if linked or real in walk.roots else None
    if owner is not None and owner != cls:
        return f"a link into class folder {owner!r}; its images keep that label"
    return None


def _check_file(path: str, cache: DecodeCache | None) -> tuple[str, str]:
    """Read, hash and decode one file: (sha256, '') or (sha256 or '', reason)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return "", read_error(e)
    if not data:
        return "", "empty file (0 bytes)"
    sha = sha256_bytes(data)
    try:
        array = decode_image(data, cache.image_size if cache is not None else VERIFY_SIZE)
    except Exception as e:  # any decoder failure means this file is unusable, never that the scan stops
        return sha, read_error(e)
    if cache is not None:
        cache.store(sha, array)  # a cache that cannot be written is an error of its own, not a bad image
    return sha, ""


def _progress(total: int, enabled: bool, desc: str):
    return tqdm(total=total, disable=not enabled, desc=desc, unit="img", leave=False)


def scan_folder(root, *, cache: DecodeCache | None = None, progress: bool = False) -> ScanResult:
    """Scan an ImageFolder tree (class = top-level folder name), reading and checking every image.

    With a cache, each new image is decoded once into it; without one, images are
    still decoded (at a tiny size) so that corrupt and truncated files are found.
    Unchanged files (same path, size and mtime) are not read again: their hash and
    status come from the file index kept in the cache folder.
    """
    index_dir = cache.root if cache is not None else DecodeCache(None, VERIFY_SIZE).root
    return scan_tree(root, cache=cache, index_dir=index_dir, progress=progress)


def scan_tree(root, *, cache: DecodeCache | None, index_dir: Path, progress: bool) -> ScanResult:
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise DataError(f"image folder not found: {root_path}")
    if not root_path.is_dir():
        raise DataError(f"not a folder: {root_path}")
    root_path = root_path.resolve()
    candidates, skipped = _list_files(root_path)
    index = FileIndex(Path(index_dir) / INDEX_NAME)
    results, todo = _lookup_known(candidates, index, cache)
    with _progress(len(candidates), progress, f"scan {root_path.name}") as bar:
        bar.update(len(candidates) - len(todo))
        for (i, st), (sha, err) in _check_many(todo, candidates, cache, bar):
            if sha:  # the stat taken before reading, so a file edited meanwhile is re-read next time
                index.record(candidates[i][0], st.st_size, st.st_mtime_ns, sha, err)
            results[i] = (sha, err)
    index.save()
    return _scan_result(root_path, candidates, results, skipped)


def _lookup_known(candidates, index: FileIndex, cache: DecodeCache | None):
    """Results already known from the index, and the candidate positions still to read."""
    results: dict[int, tuple[str, str]] = {}
    todo: list[tuple[int, os.stat_result]] = []
    for i, (path, _) in enumerate(candidates):
        try:
            st = os.stat(path)
        except OSError as e:
            results[i] = ("", read_error(e))
            continue
        if st.st_size == 0:
            results[i] = ("", "empty file (0 bytes)")
            continue
        known = index.lookup(path, st.st_size, st.st_mtime_ns)
        if known is not None and not known[1]:
            # The index knows path, size and mtime only: the file may have lost its read permission, or been
            # overwritten with its mtime put back. Opening it and reading its first bytes costs little.
            known = _still_an_image(path, known)
        if known is not None and (known[1] or cache is None or cache.contains(known[0])):
            results[i] = known
        else:
            todo.append((i, st))
    return results, todo


# The first bytes of each image format scanned (IMAGE_EXTENSIONS); WebP is RIFF....WEBP.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*")


def _still_an_image(path: str, known: tuple[str, str]) -> tuple[str, str] | None:
    """`known` if the file still opens and starts like an image; its read error; or None (read it again)."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError as e:
        return "", read_error(e)
    if head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return known
    return None


def _check_many(todo, candidates, cache, bar):
    """Yield ((position, stat), (sha, error)) per file to read, decoding on a few threads (PIL releases the GIL)."""
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [(job, pool.submit(_check_file, candidates[job[0]][0], cache)) for job in todo]
        for job, fut in futures:
            yield job, fut.result()
            bar.update(1)


def _scan_result(root: Path, candidates, results, skipped) -> ScanResult:
    rows, corrupt = [], []
    for i, (path, cls) in enumerate(candidates):
        sha, err = results[i]
        if err:
            corrupt.append((path, err))
        else:
            rows.append((path, cls, sha))
    for path, reason in corrupt:
        log.warning("unreadable image left out: %s (%s)", path, reason)
    if skipped:
        log.info("%d files skipped (hidden or not images) under %s", len(skipped), root)
    items = pd.DataFrame(rows, columns=["path", "class", "sha256"]).sort_values("path", ignore_index=True)
    if items.empty:
        raise DataError(f"no class folders with readable images in {root} (expected one sub-folder per class; "
                        f"extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return ScanResult(items=items, skipped=skipped, corrupt=corrupt)
