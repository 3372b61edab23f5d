"""Shared test fixtures: an isolated cache folder, a tiny messy ImageFolder tree, the real photos."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stanford_cars_model10"


@pytest.fixture(autouse=True)
def _isolated_cache_dir(tmp_path_factory, monkeypatch):
    """Every test writes caches under its own tmp folder (not its tmp_path), never ~/.cache/carclf."""
    monkeypatch.setenv("CARCLF_CACHE_DIR", str(tmp_path_factory.mktemp("carclf-cache")))


@pytest.fixture
def real_data_dir() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real photos not found at {REAL_DATA} (the shared data folder beside the project)")
    return REAL_DATA


def random_image(seed: int, size=(48, 32), mode: str = "RGB") -> Image.Image:
    """A noise image whose content depends on the seed only (so files differ byte-wise)."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    return rgb if mode == "RGB" else rgb.convert(mode)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@dataclass
class ImageFolderInfo:
    root: Path
    counts: dict[str, int]  # readable images per class
    corrupt: set[str] = field(default_factory=set)  # file names that must be reported unreadable
    skipped: set[str] = field(default_factory=set)  # file or folder names that must be skipped
    duplicates: list[set[str]] = field(default_factory=list)  # groups of file names with identical bytes


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def build_image_folder(root: Path) -> ImageFolderInfo:
    """Classes 'alpha' (14), 'beta' (10: every colour mode and format), 'gamma' (6), 'rare' (2), plus
    corrupt, empty, truncated, hidden and non-image files."""
    seed = iter(range(10_000))
    for i in range(12):
        _write(root / "alpha" / f"a{i:02d}.jpg", encode(random_image(next(seed)), "JPEG"))
    _write(root / "alpha" / "upper.JPG", encode(random_image(next(seed)), "JPEG"))
    _write(root / "alpha" / "other.Jpeg", encode(random_image(next(seed)), "JPEG"))
    # The same bytes twice in one class: the pair must land in one split.
    dup = encode(random_image(next(seed)), "JPEG")
    _write(root / "alpha" / "dup_1.jpg", dup)
    _write(root / "alpha" / "dup_2.jpg", dup)

    beta = {
        "gray.png": encode(random_image(next(seed), mode="L"), "PNG"),
        "rgba.png": encode(random_image(next(seed), mode="RGBA"), "PNG"),
        "palette.png": encode(random_image(next(seed), mode="P"), "PNG"),
        "palette_t.png": encode(random_image(next(seed), mode="P"), "PNG", transparency=0),
        "cmyk.jpg": encode(random_image(next(seed), mode="CMYK"), "JPEG"),
        "wide16.png": encode(Image.fromarray((np.arange(48 * 32).reshape(32, 48) * 40).astype(np.uint16)), "PNG"),
        "bitmap.BMP": encode(random_image(next(seed)), "BMP"),
        "web.webp": encode(random_image(next(seed)), "WEBP"),
        "scan.TIF": encode(random_image(next(seed)), "TIFF"),
        "scan2.tiff": encode(random_image(next(seed)), "TIFF"),
    }
    for name, data in beta.items():
        _write(root / "beta" / name, data)
    for i in range(6):
        _write(root / "gamma" / "sub" / f"g{i}.png", encode(random_image(next(seed)), "PNG"))
    for i in range(2):
        _write(root / "rare" / f"r{i}.jpg", encode(random_image(next(seed)), "JPEG"))

    good = encode(random_image(next(seed), size=(200, 120)), "JPEG")
    _write(root / "gamma" / "truncated.jpg", good[: len(good) // 2])
    _write(root / "gamma" / "empty.jpg", b"")
    _write(root / "beta" / "broken.png", b"this is not a png at all" * 10)
    _write(root / "alpha" / ".hidden.jpg", encode(random_image(next(seed)), "JPEG"))
    _write(root / "alpha" / ".thumbs" / "t.jpg", encode(random_image(next(seed)), "JPEG"))
    _write(root / "beta" / "notes.txt", b"labels were checked by hand")
    _write(root / "gamma" / "labels.csv", b"file,label\n")
    _write(root / "README.md", b"top-level file, not a class")
    return ImageFolderInfo(
        root=root,
        counts={"alpha": 16, "beta": 10, "gamma": 6, "rare": 2},
        corrupt={"truncated.jpg", "empty.jpg", "broken.png"},
        skipped={".hidden.jpg", ".thumbs", "notes.txt", "labels.csv", "README.md"},
        duplicates=[{"dup_1.jpg", "dup_2.jpg"}],
    )


@pytest.fixture
def image_folder(tmp_path) -> ImageFolderInfo:
    """A tiny ImageFolder tree with corrupt, empty, truncated, grayscale, RGBA, CMYK, palette,
    16-bit, duplicate, hidden and non-image files (see build_image_folder)."""
    return build_image_folder(tmp_path / "images")


# --------------------------------------------------------------------------- tracked runs (training, features,
# tracking and experiment tests)


def use_tracking_uri(uri: str, monkeypatch) -> None:
    """MLFLOW_TRACKING_URI points at `uri`, and nothing an earlier test set in this process outranks it."""
    import mlflow

    from carclf.tracking import runs as tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # mlflow.set_tracking_uri (which carclf calls) outranks the variable: forget an earlier test's URI.
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    monkeypatch.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", None)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)  # set_registry_uri exports it to the environment
    monkeypatch.setattr(tracking, "_experiment_ids", {})  # experiment ids are memoised per URI and process


@pytest.fixture
def tracked(tmp_path, monkeypatch) -> str:
    """A private project root, cache and sqlite tracking URI (returned); no run is left active afterwards."""
    import mlflow

    monkeypatch.setenv("CARCLF_PROJECT_ROOT", str(tmp_path))
    monkeypatch.setenv("CARCLF_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    use_tracking_uri(uri, monkeypatch)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """An empty MLflow sqlite database with its schema made (the slow part of a first connection); copy it."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("db") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def tracked_db(tracked, migrated_db) -> str:
    """`tracked` (a private project root and sqlite URI), its database already made."""
    import shutil

    shutil.copy2(migrated_db, tracked[len("sqlite:///"):])
    return tracked


@pytest.fixture
def run_artifacts():
    """run_id -> the set of every artifact path of that run (folders walked)."""
    from mlflow.tracking import MlflowClient

    def list_all(run_id: str) -> set[str]:
        client, out, todo = MlflowClient(), set(), [""]
        while todo:
            for f in client.list_artifacts(run_id, todo.pop() or None):
                (todo.append(f.path) if f.is_dir else out.add(f.path))
        return out

    return list_all


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """60 synthetic 40 px vehicle images in 5 imbalanced classes (carclf.data.demo), made once per session."""
    from carclf.data.demo import make_demo

    root = tmp_path_factory.mktemp("demo")
    make_demo(root, n_images=60, size=40, seed=0)
    return root


@pytest.fixture
def extractions(monkeypatch) -> list:
    """(backbone, split, torch threads) of every feature extraction this process makes, in order."""
    import torch

    import carclf.training.features as features

    seen = []
    real = features._extract_split

    def counted(backbone, cfg, data, split, **kw):
        seen.append((cfg.svm.backbone, split, torch.get_num_threads()))
        return real(backbone, cfg, data, split, **kw)

    monkeypatch.setattr(features, "_extract_split", counted)
    return seen
