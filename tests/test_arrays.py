"""Split arrays (carclf/data/arrays.py): one file per split and size, each image once, never stale, never half-read."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import encode, random_image

from carclf.config import BalanceConfig, DataConfig, RunConfig, SplitConfig
from carclf.data import arrays
from carclf.data.prepare import prepare_data


def _prepare(root, mode="both", samples_per_class=8, size=32):
    cfg = RunConfig.model_construct(data=DataConfig(path=root, min_images=3), split=SplitConfig(seed=1),
                                    balance=BalanceConfig(mode=mode, samples_per_class=samples_per_class), seed=0)
    return prepare_data(cfg, image_size=size)


@pytest.fixture(autouse=True)
def _fresh_memo():
    arrays.clear_memo()
    yield
    arrays.clear_memo()


def test_rows_index_the_split_array_which_holds_each_unique_image_once(image_folder):
    data = _prepare(image_folder.root)
    assert data.train["augmented"].any()  # oversampled copies are rows, not images
    split = arrays.load_split(data, "train")
    unique = data.manifest.loc[data.manifest["split"] == "train", "sha256"].nunique()
    assert split.images.shape == (unique, 32, 32, 3) and split.images.dtype == np.uint8
    assert len(split) == len(data.train) and np.array_equal(split.labels, data.train["label"].to_numpy())
    assert np.array_equal(split.augmented, data.train["augmented"].to_numpy())
    for i, row in enumerate(data.train.itertuples()):
        assert np.array_equal(split.images[split.image_index[i]], data.cache.load(row.path, row.sha256))
    assert split.path.parent == arrays.arrays_root(None) / "32px"


def test_the_same_split_and_size_is_read_back_not_rebuilt(image_folder, monkeypatch):
    first = arrays.load_split(_prepare(image_folder.root), "val")
    assert arrays.load_split(_prepare(image_folder.root, size=24), "val").path != first.path  # per image size

    def refuse(*a, **kw):
        raise AssertionError("an existing, whole split array must not be rebuilt")

    monkeypatch.setattr(arrays, "build_array", refuse)
    # Another balancing of the same split: the same file, since the array holds the split's images.
    again = arrays.load_split(_prepare(image_folder.root, mode="none"), "val")
    assert again.path == first.path and np.array_equal(np.asarray(again.images), np.asarray(first.images))


def test_a_changed_image_gets_a_new_array_and_the_old_one_is_not_served(image_folder):
    data = _prepare(image_folder.root)
    before = {name: arrays.load_split(data, name).path for name in ("train", "val", "test")}
    row = data.test.iloc[0]
    with open(row["path"], "wb") as f:  # new content under the same name
        f.write(encode(random_image(99_999), "JPEG"))
    changed = _prepare(image_folder.root)
    new = changed.manifest.set_index("path").loc[row["path"]]
    assert new["sha256"] != row["sha256"]
    # The test split lost the old content and some split gained the new one: both get new files.
    assert arrays.load_split(changed, "test").path != before["test"] and before["test"].is_file()
    split = arrays.load_split(changed, new["split"])
    assert split.path != before[new["split"]]
    frame = getattr(changed, new["split"])
    i = int(np.flatnonzero(frame["path"].to_numpy() == row["path"])[0])
    assert np.array_equal(split.images[split.image_index[i]], changed.cache.load(row["path"], new["sha256"]))


def _expected_path(data, split):
    rows = data.manifest[data.manifest["split"] == split]
    return arrays.array_path(arrays.arrays_root(None), data.cache.image_size, sorted(set(rows["sha256"])))


def test_a_leftover_temporary_file_is_never_read(image_folder):
    data = _prepare(image_folder.root)
    path = _expected_path(data, "val")
    path.parent.mkdir(parents=True)
    leftover = path.parent / f".{path.name}.abc123.tmp"  # what a run killed mid-write leaves
    leftover.write_bytes(b"\x93NUMPY half an array")
    split = arrays.load_split(data, "val")
    assert split.path == path and leftover.read_bytes().startswith(b"\x93NUMPY half")
    for i, row in enumerate(data.val.itertuples()):
        assert np.array_equal(split.images[split.image_index[i]], data.cache.load(row.path, row.sha256))


@pytest.mark.parametrize("damage", ["truncated", "trailing", "other shape"])
def test_a_damaged_array_is_rebuilt_not_served(image_folder, caplog, damage):
    data = _prepare(image_folder.root)
    good = arrays.load_split(data, "train")
    whole = good.path.read_bytes()
    reference = np.array(good.images)
    del good
    if damage == "truncated":
        good_path = _expected_path(data, "train")
        good_path.write_bytes(whole[: len(whole) - 100])
    elif damage == "trailing":
        _expected_path(data, "train").write_bytes(whole + b"\0" * 16)
    else:
        np.save(_expected_path(data, "train"), reference[:-1])
    with caplog.at_level(logging.WARNING, logger="carclf.data.arrays"):
        split = arrays.load_split(data, "train")
    assert "ignoring" in caplog.text
    assert np.array_equal(np.asarray(split.images), reference)
    assert split.path.read_bytes() == whole


@pytest.mark.parametrize("damage", ["flipped", "no checksum"])
def test_an_array_whose_pixels_changed_is_rebuilt_with_a_warning(image_folder, caplog, damage):
    import os

    data = _prepare(image_folder.root)
    path = arrays.load_split(data, "train").path
    whole = path.read_bytes()
    if damage == "flipped":
        st = path.stat()
        with open(path, "r+b") as f:  # one byte of one image, in place: same length, same header
            f.seek(len(whole) - 7)
            f.write(bytes([whole[-7] ^ 0xFF]))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        arrays.checksum_path(path).unlink()
    arrays.clear_memo()  # as a new process would
    with caplog.at_level(logging.INFO, logger="carclf.data.arrays"):
        split = arrays.load_split(data, "train")
    expected = "does not match its checksum" if damage == "flipped" else "has no checksum"
    assert expected in caplog.text and split.path.read_bytes() == whole
    assert arrays.checksum_path(path).is_file()


def test_a_checked_array_is_not_hashed_again_in_the_same_process(image_folder, monkeypatch):
    data = _prepare(image_folder.root)
    arrays.load_split(data, "val")
    monkeypatch.setattr(arrays.xxhash, "xxh3_64_hexdigest", lambda *a: pytest.fail("hashed twice"))
    arrays.load_split(data, "val")


def test_in_memory_reads_the_whole_array_once_and_memoises_it(image_folder, monkeypatch):
    data = _prepare(image_folder.root)
    split = arrays.load_split(data, "train")
    host = arrays.in_memory(split)
    assert not isinstance(host, np.memmap) and np.array_equal(host, np.asarray(split.images))
    assert arrays.in_memory(split) is host
    # A later run in this process gets the memoised copy from load_split itself.
    assert arrays.load_split(data, "train").images is host
    arrays.clear_memo()
    monkeypatch.setenv("CARCLF_SPLIT_MEMO_MB", "0")  # memo off: every call reads
    assert arrays.in_memory(split) is not arrays.in_memory(split)


def test_the_memo_is_bounded(image_folder, monkeypatch):
    data = _prepare(image_folder.root)
    splits = [arrays.load_split(data, s) for s in ("train", "val", "test")]
    limit = splits[0].nbytes + min(s.nbytes for s in splits[1:]) - 1  # never all three at once
    monkeypatch.setenv("CARCLF_SPLIT_MEMO_MB", str(limit / 2**20))
    for s in splits:
        arrays.in_memory(s)
    kept = sum(a.nbytes for a in arrays._memo.values())
    assert kept <= limit and 0 < len(arrays._memo) < 3
    assert arrays._memo_get(splits[-1].path) is not None  # the most recent stays


def test_an_empty_split_needs_no_file(image_folder):
    data = _prepare(image_folder.root)
    empty = type(data)(**{**vars(data), "val": data.val.iloc[0:0],
                          "manifest": data.manifest[data.manifest["split"] != "val"]})
    split = arrays.load_split(empty, "val")
    assert len(split) == 0 and split.images.shape == (0, 32, 32, 3) and not split.path.exists()
