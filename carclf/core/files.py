"""Files on disk: written whole or not at all, checked writable before work starts, locked, hashed."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from carclf.core.errors import DataError


def file_sha256(path: str | Path) -> str:
    p = Path(path)
    stat = p.stat()
    return _sha256_cached(str(p.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    # keyed by size and mtime so a replaced file is hashed again; VGG16's file is 528 MB
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Permission bits a new file is created with, before the umask. Cache entries stay private (what
# mkstemp gives); what a user is meant to read (results, reports, predictions) gets what an ordinary
# new file would: the user's umask decides.
PRIVATE_FILE_MODE = 0o600
USER_FILE_MODE = 0o666
_FULL = (errno.ENOSPC, errno.EDQUOT)  # a write that failed for want of room


@contextlib.contextmanager
def atomic_path(path: Path | str, *, mode: int = PRIVATE_FILE_MODE) -> Iterator[Path]:
    """A temporary path next to `path` for the block to write; moved into place when the block succeeds.

    The temporary file is created (empty, with `mode` minus the umask) before the block runs, so a
    writer that opens it by name keeps those permissions. Readers see either the old file or the
    complete new one, never a partial write; on an error the temporary file is removed.

        with atomic_path("results/x.csv", mode=USER_FILE_MODE) as tmp:
            table.to_csv(tmp, index=False)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_file(path, mode)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def exclusive_lock(path: Path | str) -> Iterator[None]:
    """Holds an exclusive flock on `path` (created if missing, never removed: removing it would let a
    waiting process and a newcomer lock two different files); waits for the holder to release it."""

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def new_temp_file(path: Path, mode: int) -> Path:
    """Create `.<name>.<random>.tmp` beside `path` exclusively (as mkstemp does), with `mode` before the umask."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def atomic_write_bytes(path: Path, write, *, mode: int = PRIVATE_FILE_MODE) -> None:
    """Call `write(fileobj)` on a temporary file next to `path`, then move it into place.

    Readers see either the old file or the complete new one, never a partial write. `mode`:
    PRIVATE_FILE_MODE (cache entries) or USER_FILE_MODE (files for people: the umask decides).
    """
    with atomic_path(path, mode=mode) as tmp, open(tmp, "wb") as f:
        write(f)


def check_can_create(path: Path | str, what: str = "", hint: str = "") -> None:
    """DataError naming `path` unless a file can be made there, found by making (and removing) a temporary file in
    its nearest existing folder: os.access says yes to root even on /proc or a read-only mount."""
    path = Path(path).expanduser()
    folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("."))
    if not folder.is_dir():
        raise write_error(path, OSError(errno.ENOTDIR, "not a folder"), what, hint)
    try:
        os.unlink(new_temp_file(folder / path.name, PRIVATE_FILE_MODE))
    except OSError as e:
        raise write_error(path, e, what, hint) from None


def write_error(path: Path | str, exc: OSError, what: str = "", hint: str = "") -> DataError:
    """A DataError naming the file that could not be written and why (disk full, read-only, no permission)."""
    reasons = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted",
               errno.ENOTDIR: "a part of its folder path is a file",
               errno.EEXIST: "a part of its folder path is a file",
               errno.EISDIR: "it is a folder"}
    reason = reasons.get(exc.errno) or exc.strerror or str(exc)
    if exc.errno in _FULL:
        hint = "free some space" + (f", or {hint}" if hint else "")
    return DataError(f"cannot write {what + ' ' if what else ''}{path}: {reason}" + (f" ({hint})" if hint else ""))
