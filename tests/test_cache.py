"""The decode cache (carclf/data/cache.py): conversion to RGB, EXIF orientation, atomic and shared entries."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pytest
from conftest import encode, random_image
from PIL import Image

from carclf.core.errors import DataError
from carclf.core.files import sha256_bytes
from carclf.data import cache as cache_module
from carclf.data import prepare as D
from carclf.data.cache import DecodeCache, decode_image


def _one_image(tmp_path, seed: int) -> tuple[Path, bytes, str]:
    """A PNG file in tmp_path: (path, its bytes, their sha256)."""
    path = tmp_path / f"car{seed}.png"
    data = encode(random_image(seed), "PNG")
    path.write_bytes(data)
    return path, data, sha256_bytes(data)


def _entries(cache: DecodeCache) -> list[Path]:
    return sorted(cache.root.rglob("*.npy"))


def _temp_files(cache: DecodeCache) -> list[Path]:
    return sorted(p for p in cache.root.rglob("*") if p.is_file() and p.name.endswith(".tmp"))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "1", "I;16"])
def test_every_colour_mode_becomes_rgb(mode):
    img = random_image(0, mode="RGB" if mode == "I;16" else mode)
    if mode == "I;16":
        img = Image.fromarray((np.arange(48 * 32).reshape(32, 48) * 40).astype(np.uint16))
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    array = decode_image(encode(img, fmt), 24)
    assert array.shape == (24, 24, 3) and array.dtype == np.uint8
    if mode == "I;16":
        assert array.max() > 200  # rescaled to the 8-bit range, not clipped to white or black
        assert array.min() < 50


def test_transparency_is_flattened_onto_white():
    clear = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    assert (decode_image(encode(clear, "PNG"), 8) == 255).all()


@pytest.mark.parametrize("width", [64, 800])  # 800: decoded in JPEG draft mode at a reduced scale
def test_exif_orientation_is_applied(width):
    # Stored left half red, right half blue; orientation 6 means "rotate 90 degrees clockwise to view",
    # so the viewed image has red on top and blue below.
    stored = Image.new("RGB", (width, width // 2), (255, 0, 0))
    stored.paste((0, 0, 255), (width // 2, 0, width, width // 2))
    exif = Image.Exif()
    exif[0x0112] = 6
    array = decode_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), 32).astype(int)
    top, bottom = array[:12].mean(axis=(0, 1)), array[-12:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_wide_images_are_squashed_not_cropped():
    # A wide photo's ends (the car's front and rear) must survive: both end colours stay visible.
    wide = Image.new("RGB", (300, 100), (0, 255, 0))
    wide.paste((255, 0, 0), (0, 0, 30, 100))
    wide.paste((0, 0, 255), (270, 0, 300, 100))
    array = decode_image(encode(wide, "PNG"), 30).astype(int)
    assert array[15, 0, 0] > 200 and array[15, -1, 2] > 200


def test_jpeg_draft_decoding_keeps_the_picture():
    big = np.zeros((800, 1600, 3), np.uint8)
    big[:, :800] = (250, 20, 20)
    big[:, 800:] = (20, 20, 250)
    array = decode_image(encode(Image.fromarray(big), "JPEG", quality=95), 50).astype(int)
    assert array[25, 5, 0] > 200 and array[25, -5, 2] > 200


def test_truncated_jpeg_raises():
    good = encode(random_image(1, size=(200, 120)), "JPEG")
    with pytest.raises(OSError, match="truncated"):
        decode_image(good[: len(good) // 2], 32)


def test_miss_then_hit_without_reading_the_file(tmp_path):
    path, data, sha = _one_image(tmp_path, 2)
    cache = DecodeCache(tmp_path / "cache", 16)
    assert not cache.contains(sha)
    first = cache.load(str(path), sha)
    assert cache.contains(sha) and _entries(cache) == [cache.entry_path(sha)]
    path.unlink()  # a hit never touches the source file
    np.testing.assert_array_equal(cache.load(str(path), sha), first)
    assert first.shape == (16, 16, 3) and first.flags.writeable


def test_default_root_follows_the_cache_dir_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("CARCLF_CACHE_DIR", str(tmp_path / "somewhere"))
    assert DecodeCache(None, 32).root == (tmp_path / "somewhere" / "decode").resolve()


def test_image_sizes_have_separate_entries(tmp_path):
    path, data, sha = _one_image(tmp_path, 3)
    small, large = DecodeCache(tmp_path / "c", 16), DecodeCache(tmp_path / "c", 24)
    assert small.load(str(path), sha).shape == (16, 16, 3)
    assert large.load(str(path), sha).shape == (24, 24, 3)
    assert small.entry_path(sha) != large.entry_path(sha)


def test_a_changed_file_gets_a_new_entry_and_the_old_one_stays(image_folder):
    cache = DecodeCache(image_folder.root.parent / "cache", 16)
    before = D.scan_folder(image_folder.root, cache=cache).items.set_index("path")["sha256"]
    entries_before = set(_entries(cache))
    target = image_folder.root / "alpha" / "a03.jpg"
    target.write_bytes(encode(random_image(999), "JPEG"))
    os.utime(target, ns=(1, 1))  # a different mtime, whatever the clock resolution
    after = D.scan_folder(image_folder.root, cache=cache).items.set_index("path")["sha256"]
    changed = after[after != before]
    assert list(changed.index) == [str(target)]
    new_sha = changed.iloc[0]
    assert set(_entries(cache)) == entries_before | {cache.entry_path(new_sha)}
    np.testing.assert_array_equal(cache.load(str(target), new_sha),
                                  decode_image(target.read_bytes(), 16))


def test_warm_scan_reads_no_image_again(image_folder, monkeypatch):
    cache = DecodeCache(image_folder.root.parent / "cache", 16)
    first = D.scan_folder(image_folder.root, cache=cache)

    def must_not_read(path, cache):
        raise AssertionError(f"re-read {path}")

    import carclf.data.scan

    monkeypatch.setattr(carclf.data.scan, "_check_file", must_not_read)
    second = D.scan_folder(image_folder.root, cache=cache)
    assert second.items.equals(first.items) and second.corrupt == first.corrupt


def test_load_refuses_a_file_that_changed_since_the_scan(tmp_path):
    path = tmp_path / "car.png"
    path.write_bytes(encode(random_image(4), "PNG"))
    stale_sha = sha256_bytes(b"what the scan saw")
    with pytest.raises(DataError, match="changed since it was scanned"):
        DecodeCache(tmp_path / "cache", 16).load(str(path), stale_sha)


def test_partial_files_are_never_read(tmp_path):
    path, data, sha = _one_image(tmp_path, 5)
    cache = DecodeCache(tmp_path / "cache", 16)
    expected = decode_image(data, 16)
    entry = cache.entry_path(sha)
    entry.parent.mkdir(parents=True)
    # What a killed writer leaves: a temporary file (never opened) ...
    (entry.parent / f".{entry.name}.abc123.tmp").write_bytes(b"\x93NUMPY partial")
    assert not cache.contains(sha)
    np.testing.assert_array_equal(cache.load(str(path), sha), expected)
    # ... and, on a damaged disk, a cut-off entry: detected and decoded again, not returned.
    full = entry.read_bytes()
    entry.write_bytes(full[: len(full) // 2])
    np.testing.assert_array_equal(cache.load(str(path), sha), expected)
    assert entry.read_bytes() == full


def test_an_interrupted_write_leaves_no_entry(tmp_path, monkeypatch):
    path, data, sha = _one_image(tmp_path, 6)
    cache = DecodeCache(tmp_path / "cache", 16)

    def dies_half_way(f, header, pixels):
        f.write(header + b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "_write_entry", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        cache.load(str(path), sha)
    assert not cache.contains(sha) and _temp_files(cache) == []
    monkeypatch.undo()
    np.testing.assert_array_equal(cache.load(str(path), sha), decode_image(data, 16))


def _filled(tmp_path, seed: int = 7, size: int = 16):
    """(cache, source path, sha, expected array, the entry's good bytes) for one image already cached."""
    path, data, sha = _one_image(tmp_path, seed)
    cache = DecodeCache(tmp_path / "cache", size)
    expected = cache.load(str(path), sha)
    return cache, path, sha, expected, cache.entry_path(sha).read_bytes()


def _flip_one_pixel_byte(raw: bytes) -> bytes:
    at = len(raw) // 2  # inside the pixels: the header is about 128 bytes, the checksum the last 8
    return raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1:]


@pytest.mark.parametrize("damage", ["zeroed", "pixels zeroed", "one flipped bit", "truncated", "checksum zeroed",
                                    "deleted"])
def test_a_damaged_entry_is_never_served_and_is_rebuilt(tmp_path, damage, caplog):
    cache, path, sha, expected, good = _filled(tmp_path)
    entry = cache.entry_path(sha)
    if damage == "deleted":
        entry.unlink()
    else:
        header = len(cache_module._npy_header(16))
        entry.write_bytes({"zeroed": bytes(len(good)), "pixels zeroed": good[:header] + bytes(len(good) - header),
                           "one flipped bit": _flip_one_pixel_byte(good),
                           "truncated": good[:-20], "checksum zeroed": good[:-8] + bytes(8)}[damage])
    with caplog.at_level("WARNING"):
        np.testing.assert_array_equal(cache.load(str(path), sha), expected)
    assert entry.read_bytes() == good  # repaired in place
    if damage != "deleted":  # a missing entry is an ordinary miss, not a warning
        assert f"rebuilding damaged decode-cache entry {entry}" in caplog.text
    np.testing.assert_array_equal(cache.load(str(path), sha), expected)


def test_a_rescan_decodes_a_cut_off_entry_again(image_folder):
    cache = DecodeCache(image_folder.root.parent / "cache", 16)
    items = D.scan_folder(image_folder.root, cache=cache).items
    sha = items["sha256"].iloc[0]
    good = cache.entry_path(sha).read_bytes()
    cache.entry_path(sha).write_bytes(good[:100])
    assert not cache.contains(sha)
    D.scan_folder(image_folder.root, cache=cache)
    assert cache.entry_path(sha).read_bytes() == good


def test_entries_stay_readable_by_numpy(tmp_path):
    cache, path, sha, expected, _ = _filled(tmp_path)
    np.testing.assert_array_equal(np.load(cache.entry_path(sha), allow_pickle=False), expected)


def test_a_full_disk_while_writing_an_entry_names_the_path_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    path, data, sha = _one_image(tmp_path, 8)
    cache = DecodeCache(tmp_path / "cache", 16)

    def disk_fills_up(f, header, pixels):
        f.write(header)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module, "_write_entry", disk_fills_up)
    with pytest.raises(DataError) as err:
        cache.load(str(path), sha)
    message = str(err.value)
    assert str(cache.entry_path(sha)) in message and "no space left on the device (free some space" in message
    assert _temp_files(cache) == [] and _entries(cache) == []
    monkeypatch.undo()  # space freed: the next load fills the entry
    np.testing.assert_array_equal(cache.load(str(path), sha), decode_image(data, 16))


def _load_all(args):
    root, jobs = args
    cache = DecodeCache(root, 16)
    return [cache.load(p, h).tobytes() for p, h in jobs]


def test_several_processes_fill_the_same_entries_safely(tmp_path):
    jobs = []
    for i in range(12):
        path = tmp_path / f"img{i}.png"
        data = encode(random_image(100 + i, size=(120, 80)), "PNG")
        path.write_bytes(data)
        jobs.append((str(path), sha256_bytes(data)))
    root = tmp_path / "cache"
    with ProcessPoolExecutor(max_workers=3, mp_context=get_context("fork")) as pool:
        results = list(pool.map(_load_all, [(root, jobs)] * 3))
    assert results[0] == results[1] == results[2]
    cache = DecodeCache(root, 16)
    assert len(_entries(cache)) == 12 and _temp_files(cache) == []
    for (path, _), got in zip(jobs, results[0]):
        assert got == decode_image(Path(path).read_bytes(), 16).tobytes()


def test_an_unwritable_cache_is_an_error_not_a_bad_image(image_folder, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(DataError, match="cannot write the decode cache"):
        D.scan_folder(image_folder.root, cache=DecodeCache(blocker / "decode", 16))


def test_cache_entries_stay_private_and_files_for_people_follow_the_umask(tmp_path):
    from carclf.core.files import USER_FILE_MODE, atomic_path, atomic_write_bytes

    path, data, sha = _one_image(tmp_path, 9)
    cache = DecodeCache(tmp_path / "cache", 16)
    old = os.umask(0o022)
    try:
        cache.load(str(path), sha)
        atomic_write_bytes(tmp_path / "report.bin", lambda f: f.write(b"x"), mode=USER_FILE_MODE)
        with atomic_path(tmp_path / "table.csv", mode=USER_FILE_MODE) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".table.csv.") and tmp.is_file()
            tmp.write_text("a,b\n")
    finally:
        os.umask(old)
    assert cache.entry_path(sha).stat().st_mode & 0o777 == 0o600  # as mkstemp made them
    assert (tmp_path / "report.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "table.csv").stat().st_mode & 0o777 == 0o644
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "table.csv", mode=USER_FILE_MODE) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert (tmp_path / "table.csv").read_text() == "a,b\n" and not list(tmp_path.glob(".table.csv.*"))
