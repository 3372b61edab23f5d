"""The synthetic demo set (carclf/data/demo.py): labelled synthetic, imbalanced, readable, reproducible."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from carclf.cli import main as cli_main
from carclf.core.errors import DataError
from carclf.data import prepare as D
from carclf.data.demo import CLASS_SHARES, make_demo


def test_demo_set_is_imbalanced_labelled_and_scans(tmp_path):
    out = tmp_path / "demo"
    start = time.perf_counter()
    table = make_demo(out, n_images=120, size=48, seed=3)
    assert time.perf_counter() - start < 10
    counts = dict(zip(table["class"], table["count"]))
    assert set(counts) == set(CLASS_SHARES) and sum(counts.values()) == 120
    assert max(counts.values()) >= 2.5 * min(counts.values())
    assert "SYNTHETIC" in (out / "README.txt").read_text()
    scan = D.scan_folder(out)
    assert scan.corrupt == [] and scan.items["class"].value_counts().to_dict() == counts
    with Image.open(scan.items["path"][0]) as img:
        assert img.size == (48, 48) and img.mode == "RGB"
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # the temporary build folder is gone


def test_same_seed_same_images_and_varied_content(tmp_path):
    make_demo(tmp_path / "a", n_images=40, size=32, seed=1)
    make_demo(tmp_path / "b", n_images=40, size=32, seed=1)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert files_a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.jpg"))
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
    pixels = [np.asarray(Image.open(tmp_path / "a" / f)).mean(axis=(0, 1)) for f in files_a]
    assert np.std(pixels, axis=0).min() > 5  # random colours and backgrounds, not one template


def test_cli_refuses_a_non_empty_folder_unless_forced(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli_main(["data", "demo", str(out), "--images", "30", "--size", "32"]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli_main(["data", "demo", str(out), "--images", "30", "--size", "32", "--force"]) == 0
    assert "synthetic" in capsys.readouterr().out
    assert (out / "keep.txt").read_text() == "mine"
    assert cli_main(["data", "demo", str(out), "--images", "20", "--size", "32", "--force"]) == 0
    assert len(list(out.rglob("*.jpg"))) == 20  # the old class folders were replaced, not merged


def test_too_few_images_is_an_error(tmp_path):
    with pytest.raises(DataError, match="at least"):
        make_demo(tmp_path / "d", n_images=3)
