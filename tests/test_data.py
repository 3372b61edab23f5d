"""Scanning, class selection, leak-free splitting, balancing and prepare_data (carclf/data/prepare.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import encode, random_image

from carclf.cli import main as cli_main
from carclf.config import BalanceConfig, DataConfig, RunConfig, SplitConfig
from carclf.core.errors import DataError
from carclf.data import prepare as D
from carclf.data.cache import DecodeCache
from carclf.data.transforms import TrainPreset

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stanford_cars_model10"


class _Input:
    size = 32
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)


def _names(entries) -> set[str]:
    return {Path(p).name for p, _ in entries}


def _scan(info, size=32):
    return D.scan_folder(info.root, cache=DecodeCache(info.root.parent / "cache", size))


def _assert_no_leak(manifest: pd.DataFrame, train: pd.DataFrame | None = None) -> None:
    """No validation or test image, nor a byte-identical copy of one, appears in training."""
    train = manifest[manifest["split"] == "train"] if train is None else train
    held_out = manifest[manifest["split"] != "train"]
    assert not set(train["path"]) & set(held_out["path"])
    assert not set(train["sha256"]) & set(held_out["sha256"])


# --------------------------------------------------------------------------- scanning


def test_scan_reports_bad_files_and_keeps_every_readable_one(image_folder):
    scan = _scan(image_folder)
    assert scan.items["class"].value_counts().to_dict() == image_folder.counts
    assert _names(scan.corrupt) == image_folder.corrupt
    assert all(reason for _, reason in scan.corrupt)
    assert image_folder.skipped <= _names(scan.skipped)
    assert not _names(scan.skipped) & {Path(p).name for p in scan.items["path"]}
    assert all(Path(p).is_absolute() for p in scan.items["path"])
    names = {Path(p).name for p in scan.items["path"]}
    assert {"upper.JPG", "other.Jpeg", "bitmap.BMP", "scan.TIF", "web.webp"} <= names


def test_scan_without_cache_still_finds_truncated_files(image_folder):
    scan = D.scan_folder(image_folder.root)
    assert _names(scan.corrupt) == image_folder.corrupt
    assert len(scan.items) == sum(image_folder.counts.values())


def test_scan_reasons_name_the_problem(image_folder):
    reasons = {Path(p).name: r for p, r in _scan(image_folder).corrupt}
    assert "empty" in reasons["empty.jpg"]
    assert "truncated" in reasons["truncated.jpg"].lower()
    assert not any("BytesIO" in r or "0x" in r for r in reasons.values()), reasons  # no in-memory buffer named


@pytest.mark.parametrize("setup", ["missing", "file", "no_classes", "only_bad"])
def test_scan_refuses_unusable_folders(tmp_path, setup):
    root = tmp_path / "data"
    if setup == "file":
        root.write_text("x")
    elif setup == "no_classes":
        root.mkdir()
        (root / "loose.jpg").write_bytes(b"x")
    elif setup == "only_bad":
        (root / "cls").mkdir(parents=True)
        (root / "cls" / "a.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=str(root.name)):
        D.scan_folder(root)


def test_scan_result_does_not_depend_on_a_second_scan(image_folder):
    first = _scan(image_folder)
    second = _scan(image_folder)  # served from the file index and the warm cache
    pd.testing.assert_frame_equal(first.items, second.items)
    assert first.corrupt == second.corrupt


def test_a_file_overwritten_since_the_last_scan_is_read_again_even_with_its_mtime_put_back(image_folder):
    import os

    first = _scan(image_folder)
    victim = Path(first.items["path"].iloc[0])
    st = victim.stat()
    victim.write_bytes(b"\0" * st.st_size)  # same size ...
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the same mtime: the index alone would trust it
    second = _scan(image_folder)
    assert str(victim) not in set(second.items["path"]) and str(victim) in {p for p, _ in second.corrupt}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its permissions")
def test_a_file_made_unreadable_since_the_last_scan_is_named(image_folder):
    first = _scan(image_folder)
    victim = Path(first.items["path"].iloc[0])
    victim.chmod(0)
    try:
        second = _scan(image_folder)
    finally:
        victim.chmod(0o644)
    assert dict(second.corrupt)[str(victim)].startswith("PermissionError")


# --------------------------------------------------------------------------- classes


# --------------------------------------------------------------------------- links


def _photos(folder: Path, n: int, first_seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"p{i}.jpg").write_bytes(encode(random_image(first_seed + i), "JPEG"))


def _rows_by_class(scan) -> dict[str, int]:
    return scan.items["class"].value_counts().to_dict()


def test_symlink_loops_are_followed_once_and_named_in_a_warning(tmp_path, caplog):
    root = tmp_path / "cars"
    _photos(root / "alpha" / "sub", 4, 0)
    _photos(root / "beta", 3, 100)
    (root / "alpha" / "sub" / "back").symlink_to("..", target_is_directory=True)  # up: alpha again
    (root / "alpha" / "sub" / "top").symlink_to("../..", target_is_directory=True)  # up: the root, all classes
    (root / "alpha" / "here").symlink_to(".", target_is_directory=True)
    with caplog.at_level(logging.WARNING):
        scan = D.scan_folder(root)
    assert _rows_by_class(scan) == {"alpha": 4, "beta": 3}  # every image once, with its own label
    assert scan.items["sha256"].is_unique
    for link in ("alpha/sub/back", "alpha/here"):
        assert f"{root / link}: a symlink loop" in caplog.text
    assert any(p == str(root / "alpha/sub/top") and "loop" in reason for p, reason in scan.skipped)


def test_links_into_another_class_never_relabel_its_images(tmp_path, caplog):
    root = tmp_path / "cars"
    _photos(root / "alpha", 2, 0)
    _photos(root / "beta", 3, 100)
    (root / "alpha" / "all_of_beta").symlink_to(root / "beta", target_is_directory=True)
    (root / "alpha" / "one_of_beta.jpg").symlink_to(root / "beta" / "p0.jpg")
    (root / "beta_again").symlink_to("beta", target_is_directory=True)  # a class folder under a second name
    with caplog.at_level(logging.WARNING):
        scan = D.scan_folder(root)
    assert _rows_by_class(scan) == {"alpha": 2, "beta": 3}
    beta = set(scan.items.loc[scan.items["class"] == "beta", "path"])
    assert beta == {str(root / f"beta/p{i}.jpg") for i in range(3)}
    assert "all_of_beta: a link into class folder 'beta'" in caplog.text
    assert "one_of_beta.jpg: a link to an image of class 'beta'" in caplog.text
    assert "beta_again: the same folder as class 'beta'" in caplog.text


def test_a_file_reached_twice_is_counted_once_under_the_first_class_in_sorted_order(tmp_path, caplog):
    shared = tmp_path / "shared"  # outside the data folder: links to it are followed
    _photos(shared, 2, 0)
    root = tmp_path / "cars"
    _photos(root / "alpha", 1, 50)
    _photos(root / "beta", 1, 60)
    for cls in ("beta", "alpha"):
        (root / cls / "ext").symlink_to(shared, target_is_directory=True)
    (root / "alpha" / "ext_again").symlink_to(shared, target_is_directory=True)
    with caplog.at_level(logging.WARNING):
        scan = D.scan_folder(root)
    assert _rows_by_class(scan) == {"alpha": 3, "beta": 1}
    assert f"{root / 'beta/ext'}: the same folder as {root / 'alpha/ext'}" in caplog.text
    assert f"{root / 'alpha/ext_again'}: the same folder as {root / 'alpha/ext'}" in caplog.text


def _items(counts: dict[str, int]) -> pd.DataFrame:
    rows = [(f"/d/{c}/{i}.jpg", c, f"{c}-{i}") for c, n in counts.items() for i in range(n)]
    return pd.DataFrame(rows, columns=["path", "class", "sha256"])


def test_select_all_named_and_top_k():
    items = _items({"a": 9, "b": 5, "c": 7, "d": 7})
    assert D.select_classes(items)[1] == ["a", "b", "c", "d"]
    sel, classes = D.select_classes(items, classes=["d", "b"])
    assert classes == ["b", "d"] and set(sel["class"]) == {"b", "d"}
    assert D.select_classes(items, top_k=2)[1] == ["a", "c"]  # c and d tie at 7: the name decides


def test_min_images_warns_naming_the_classes_left_out(caplog):
    items = _items({"big": 8, "tiny": 2, "small": 3})
    with caplog.at_level(logging.WARNING, logger="carclf.data.prepare"):
        sel, classes = D.select_classes(items, min_images=4)
    assert classes == ["big"] and len(sel) == 8
    assert "tiny" in caplog.text and "small" in caplog.text


def test_empty_or_unknown_selection_is_an_error():
    items = _items({"a": 2})
    with pytest.raises(DataError, match="empty"):
        D.select_classes(items, min_images=5)
    with pytest.raises(DataError, match="nope"):
        D.select_classes(items, classes=["nope"])


def test_class_table_counts_each_class():
    items = _items({"a": 3, "b": 5})
    table = D.class_table(items, ["a", "b"])
    assert table.to_dict("list") == {"index": [0, 1], "class": ["a", "b"], "count": [3, 5]}


def test_find_duplicates_groups_identical_bytes(image_folder):
    groups = D.find_duplicates(_scan(image_folder).items)
    assert [{Path(p).name for p in g} for g in groups] == image_folder.duplicates


# --------------------------------------------------------------------------- split


def _dup_items(seed: int = 0) -> pd.DataFrame:
    """Three classes, with duplicate groups of 2 and 3 copies (one of them across classes)."""
    items = _items({"a": 40, "b": 25, "c": 12})
    items.loc[items["path"] == "/d/a/1.jpg", "sha256"] = "a-0"
    items.loc[items["path"].isin(["/d/b/3.jpg", "/d/b/4.jpg"]), "sha256"] = "b-2"
    items.loc[items["path"] == "/d/c/5.jpg", "sha256"] = "a-7"  # same bytes filed under two classes
    return items.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def test_split_keeps_duplicates_together_and_never_leaks():
    manifest = D.split_items(_dup_items(), ["a", "b", "c"], seed=3)
    assert manifest.groupby("sha256")["split"].nunique().max() == 1
    _assert_no_leak(manifest)
    assert list(manifest.columns) == D.MANIFEST_COLUMNS


def test_split_is_stratified():
    items = _items({"a": 100, "b": 50, "c": 20})
    manifest = D.split_items(items, ["a", "b", "c"], fractions=(0.7, 0.1, 0.2), seed=0)
    counts = manifest.groupby(["class", "split"]).size().unstack()
    assert counts.loc["a"].to_dict() == {"test": 20, "train": 70, "val": 10}
    assert counts.loc["b"].to_dict() == {"test": 10, "train": 35, "val": 5}
    assert counts.loc["c"].to_dict() == {"test": 4, "train": 14, "val": 2}
    assert (manifest["label"] == manifest["class"].map({"a": 0, "b": 1, "c": 2})).all()


def test_same_seed_same_manifest_whatever_the_listing_order():
    classes = ["a", "b", "c"]
    first = D.split_items(_dup_items(seed=0), classes, seed=7)
    second = D.split_items(_dup_items(seed=1), classes, seed=7)
    pd.testing.assert_frame_equal(first, second)
    assert D.manifest_hash(first) == D.manifest_hash(second)
    other = D.split_items(_dup_items(seed=0), classes, seed=8)
    assert not first["split"].equals(other["split"])
    assert D.manifest_hash(first) != D.manifest_hash(other)


def test_small_classes_still_reach_every_split():
    manifest = D.split_items(_items({"a": 3, "b": 4}), ["a", "b"])
    assert (manifest.groupby("class")["split"].nunique() == 3).all()


@pytest.mark.parametrize("n", [1, 2])
def test_a_class_too_small_to_reach_val_and_test_is_named_in_a_warning(n, caplog):
    with caplog.at_level(logging.WARNING, logger="carclf.data.prepare"):
        manifest = D.split_items(_items({"tiny": n, "big": 10}), ["big", "tiny"])
    assert set(manifest.loc[manifest["class"] == "tiny", "split"]) == {"train"}
    assert f"tiny ({n}: {n} train, 0 val, 0 test)" in caplog.text and "big" not in caplog.text
    assert "data.min_images to 3" in caplog.text


def test_classes_reaching_every_split_give_no_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="carclf.data.prepare"):
        D.split_items(_items({"a": 3, "b": 10}), ["a", "b"])
    assert "too small" not in caplog.text


def test_the_same_image_under_two_classes_is_a_label_conflict_named_and_left_out(caplog):
    items = _dup_items()
    assert D.label_conflicts(items) == [["/d/a/7.jpg", "/d/c/5.jpg"]]
    assert D.label_conflicts(_items({"a": 3, "b": 3})) == []
    with caplog.at_level(logging.WARNING, logger="carclf.data.prepare"):
        kept = D.drop_label_conflicts(items)
    assert "label conflict" in caplog.text and "/d/a/7.jpg (a), /d/c/5.jpg (c)" in caplog.text
    assert len(kept) == len(items) - 2 and not {"/d/a/7.jpg", "/d/c/5.jpg"} & set(kept["path"])
    assert D.find_duplicates(kept) == [["/d/a/0.jpg", "/d/a/1.jpg"], ["/d/b/2.jpg", "/d/b/3.jpg", "/d/b/4.jpg"]]


def test_a_zero_fraction_leaves_that_split_empty():
    manifest = D.split_items(_items({"a": 10, "b": 6}), ["a", "b"], fractions=(0.8, 0.0, 0.2))
    assert set(manifest["split"]) == {"train", "test"}


def test_bad_fractions_are_refused():
    with pytest.raises(DataError, match="fractions"):
        D.split_items(_items({"a": 5}), ["a"], fractions=(0.5, 0.2, 0.2))


def test_manifest_round_trip_is_atomic(tmp_path):
    manifest = D.split_items(_dup_items(), ["a", "b", "c"])
    out = D.save_manifest(manifest, tmp_path / "m.parquet")
    pd.testing.assert_frame_equal(D.load_manifest(out), manifest)
    assert [p.name for p in tmp_path.iterdir()] == ["m.parquet"]  # no temporary file left behind
    with pytest.raises(DataError, match="nothere"):
        D.load_manifest(tmp_path / "nothere.parquet")
    manifest.drop(columns=["split"]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="split"):
        D.load_manifest(tmp_path / "bad.parquet")


# --------------------------------------------------------------------------- balance


def _train(counts) -> pd.DataFrame:
    items = _items(counts)
    manifest = D.split_items(items, sorted(counts), fractions=(0.8, 0.1, 0.1))
    return manifest[manifest["split"] == "train"]


@pytest.mark.parametrize("n", [None, 5, 30])
def test_balance_both_gives_exactly_n_per_class(n):
    train = _train({"a": 50, "b": 12, "c": 25})
    balanced = D.balance(train, mode="both", samples_per_class=n, seed=0)
    target = n if n is not None else int(np.median(train["class"].value_counts()))
    assert (balanced["class"].value_counts() == target).all()
    assert set(balanced["path"]) <= set(train["path"])  # fill-ups are copies of the class's own train images
    real = balanced[~balanced["augmented"]]
    assert not real["path"].duplicated().any()


def test_balance_modes():
    train = _train({"a": 50, "b": 12})
    n = 20
    under = D.balance(train, mode="undersample", samples_per_class=n)
    assert under["class"].value_counts().to_dict() == {"a": n, "b": (train["class"] == "b").sum()}
    assert not under["augmented"].any()
    over = D.balance(train, mode="oversample", samples_per_class=n)
    assert over["class"].value_counts().to_dict() == {"a": (train["class"] == "a").sum(), "b": n}
    assert over["augmented"].sum() == n - (train["class"] == "b").sum()
    none = D.balance(train, mode="none")
    assert len(none) == len(train) and not none["augmented"].any()
    with pytest.raises(DataError, match="mode"):
        D.balance(train, mode="smote")


def test_balance_is_deterministic_and_fills_evenly():
    train = _train({"a": 40, "b": 6})
    first = D.balance(train, mode="both", samples_per_class=20, seed=1)
    second = D.balance(train.sample(frac=1.0, random_state=3), mode="both", samples_per_class=20, seed=1)
    pd.testing.assert_frame_equal(first, second)
    copies = first[first["class"] == "b"]["path"].value_counts()
    assert copies.max() - copies.min() <= 1


def test_balance_refuses_validation_or_test_rows():
    manifest = D.split_items(_items({"a": 20}), ["a"])
    with pytest.raises(DataError, match="train split only"):
        D.balance(manifest, mode="both")


def test_class_weights_preserve_the_total_and_invert_frequency():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    w = D.class_weights(labels, 4)
    assert w[labels].sum() == pytest.approx(len(labels))  # mean weight over samples is 1
    assert w[0] * 60 == pytest.approx(w[1] * 30) == pytest.approx(w[2] * 10)
    assert w[3] == 1.0


# --------------------------------------------------------------------------- prepare_data and the dataset


def _cfg(root, **balance) -> RunConfig:
    # model_construct: the data pipeline reads only these sections (no model registry needed).
    return RunConfig.model_construct(data=DataConfig(path=root, min_images=3), split=SplitConfig(seed=1),
                                     balance=BalanceConfig(**balance), seed=0)


def test_prepare_data_balances_train_only(image_folder):
    prepared = D.prepare_data(_cfg(image_folder.root, mode="both", samples_per_class=8), image_size=32)
    assert prepared.classes == ["alpha", "beta", "gamma"]  # 'rare' has 2 < min_images=3
    assert (prepared.train["class"].value_counts() == 8).all()
    for held_out in (prepared.val, prepared.test):
        assert not held_out["augmented"].any()
        assert len(held_out) > 0
    _assert_no_leak(prepared.manifest, prepared.train)
    assert _names(prepared.corrupt) == image_folder.corrupt
    assert [{Path(p).name for p in g} for g in prepared.duplicates] == image_folder.duplicates
    assert prepared.class_counts["count"].tolist() == [16, 10, 6]
    assert all(prepared.cache.contains(h) for h in prepared.manifest["sha256"])


def test_image_dataset_gives_tensors_and_fresh_augmentation(image_folder):
    prepared = D.prepare_data(_cfg(image_folder.root, mode="none"), image_size=32)
    dataset = D.ImageDataset(prepared.train, prepared.cache, TrainPreset(_Input(), strength=1.0))
    x, y = dataset[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    # Random ops run at every access, so an epoch later the same item looks different.
    assert not all(torch.equal(dataset[0][0], dataset[0][0]) for _ in range(3))
    plain = D.ImageDataset(prepared.val, prepared.cache, None)
    x, _ = plain[0]
    assert x.shape == (3, 32, 32) and 0.0 <= x.min() and x.max() <= 1.0


# --------------------------------------------------------------------------- CLI


def test_cli_stats_and_split(image_folder, tmp_path, capsys):
    figure = tmp_path / "freq.png"
    assert cli_main(["data", "stats", str(image_folder.root), "--figure", str(figure), "--min-images", "1"]) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "rare" in out and "truncated.jpg" in out and "notes.txt" in out
    assert "1 groups" in out
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest_path = tmp_path / "m.parquet"
    assert cli_main(["data", "split", str(image_folder.root), "--out", str(manifest_path), "--seed", "4"]) == 0
    manifest = D.load_manifest(manifest_path)
    assert set(manifest["class"]) == {"alpha", "beta", "gamma"}  # rare (2) < default --min-images 5
    _assert_no_leak(manifest)


def test_cli_stats_shows_class_and_count_and_escapes_odd_file_names(image_folder, tmp_path, capsys):
    data = image_folder.root
    original = next(data.rglob("dup_1.jpg"))
    (original.parent / "twin\nline.jpg").write_bytes(original.read_bytes())
    assert cli_main(["data", "stats", str(data), "--figure", str(tmp_path / "f.png"), "--min-images", "1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["class", "count"]
    assert "twin\\nline.jpg" in out and "twin\nline" not in out


def test_cli_keeps_its_file_index_in_the_chosen_cache_dir(image_folder, tmp_path, capsys):
    args = ["data", "split", str(image_folder.root), "--out", str(tmp_path / "m.parquet")]
    assert cli_main(args + ["--cache-dir", str(tmp_path / "cc")]) == 0
    assert (tmp_path / "cc" / "decode" / "files.parquet").is_file()


def test_cli_split_to_an_unwritable_path_names_it_without_traceback(image_folder, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where a folder should be")
    out = blocker / "m.parquet"
    assert cli_main(["data", "split", str(image_folder.root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the manifest {out}: a part of its folder path is a file" in err and "Traceback" not in err


def test_a_full_disk_while_saving_a_manifest_leaves_nothing(tmp_path, monkeypatch):
    import errno

    def disk_fills_up(self, f, **kw):
        f.write(b"PAR1")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", disk_fills_up)
    manifest = D.split_items(_items({"a": 5, "b": 5}), ["a", "b"], seed=0)
    with pytest.raises(DataError, match=f"cannot write the manifest {tmp_path / 'm.parquet'}: no space left"):
        D.save_manifest(manifest, tmp_path / "m.parquet")
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_a_missing_folder_without_traceback(tmp_path, capsys):
    assert cli_main(["data", "stats", str(tmp_path / "absent")]) == 2
    assert "absent" in capsys.readouterr().err


# --------------------------------------------------------------------------- the real photos


@pytest.fixture(scope="module")
def real_scan(tmp_path_factory):
    if not REAL_DATA.is_dir():
        pytest.skip(f"real photos not found at {REAL_DATA} (the shared data folder beside the project)")
    cache = DecodeCache(tmp_path_factory.mktemp("real-cache"), 32)
    return D.scan_folder(REAL_DATA, cache=cache)


@pytest.mark.real_data
def test_real_photos_scan_cleanly(real_scan):
    assert len(real_scan.items) == 1109
    assert real_scan.items["class"].nunique() == 10
    assert real_scan.corrupt == []


@pytest.mark.real_data
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_real_duplicate_pairs_land_in_one_split(real_scan, seed):
    groups = D.find_duplicates(real_scan.items)
    assert sorted(len(g) for g in groups) == [2, 2]
    items, classes = D.select_classes(real_scan.items)
    manifest = D.split_items(items, classes, seed=seed)
    for group in groups:
        assert manifest.loc[manifest["path"].isin(group), "split"].nunique() == 1
    _assert_no_leak(manifest)
    balanced = D.balance(manifest[manifest["split"] == "train"], mode="both", samples_per_class=None, seed=seed)
    assert balanced["class"].value_counts().nunique() == 1
