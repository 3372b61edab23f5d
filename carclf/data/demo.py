"""A synthetic, clearly labelled demo data set of drawn vehicles: a pipeline check, not a benchmark.

    carclf data demo demo_data            # 300 images, 96 px, 5 imbalanced classes, in seconds

Each class is a different silhouette (sedan, pickup, bus, van, sports car) drawn with
random paint, position, scale, direction and background, so a classifier can learn
it but must look at shape, not colour. Class sizes are deliberately unequal so that
balancing and class weights have something to do.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from carclf.core.errors import DataError

log = logging.getLogger(__name__)

# Share of the images per class: the largest class is about 3.5x the smallest.
CLASS_SHARES = {"sedan": 0.32, "pickup": 0.22, "bus": 0.18, "van": 0.19, "sportscar": 0.09}

README = """SYNTHETIC DEMO DATA -- NOT REAL PHOTOS

Written by `carclf data demo` (seed {seed}): {n} drawn images of {k} vehicle-like
shapes ({classes}), {size}x{size} px, with random colours, positions, scales and
backgrounds. The class sizes are deliberately imbalanced:
{counts}

It exists so that the pipeline (scan, split, balance, train, sweep, report) runs
offline on a fresh machine. Scores on it say nothing about car-model
classification; point carclf at real photos (any ImageFolder tree) for that.
"""

# Silhouettes in a unit box (x to the right = front of the vehicle, y down; ground at y=1).
# Each is (body polygon, window polygons, wheel x positions, wheel radius).
_SHAPES = {
    "sedan": ([(0, .55), (.22, .5), (.32, .22), (.7, .22), (.82, .5), (1, .58), (1, .85), (0, .85)],
              [[(.35, .27), (.5, .27), (.5, .48), (.28, .48)], [(.54, .27), (.68, .27), (.77, .48), (.54, .48)]],
              [.2, .8], .13),
    "pickup": ([(0, .45), (.05, .45), (.05, .6), (.55, .6), (.55, .15), (.8, .15), (.9, .45), (1, .5), (1, .85),
                (0, .85)],
               [[(.6, .2), (.78, .2), (.85, .43), (.6, .43)]], [.18, .8], .14),
    "bus": ([(0, .05), (1, .05), (1, .88), (0, .88)],
            [[(x, .15), (x + .12, .15), (x + .12, .45), (x, .45)] for x in (.04, .2, .36, .52, .68)]
            + [[(.86, .15), (.97, .15), (.97, .55), (.86, .55)]], [.15, .38, .85], .11),
    "van": ([(0, .1), (.7, .1), (.95, .45), (1, .55), (1, .85), (0, .85)],
            [[(.05, .18), (.3, .18), (.3, .42), (.05, .42)], [(.35, .18), (.62, .18), (.62, .42), (.35, .42)],
             [(.67, .18), (.73, .18), (.88, .45), (.67, .45)]], [.2, .8], .13),
    "sportscar": ([(0, .62), (.25, .55), (.4, .4), (.62, .4), (.8, .58), (1, .68), (1, .86), (0, .86)],
                  [[(.43, .44), (.6, .44), (.72, .57), (.4, .57)]], [.2, .82], .12),
}


def _class_counts(n_images: int) -> dict[str, int]:
    counts = {c: max(2, int(round(share * n_images))) for c, share in CLASS_SHARES.items()}
    counts["sedan"] += n_images - sum(counts.values())  # the largest class absorbs the rounding
    return counts


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Sky-to-ground gradient with noise, in random hues: something a model must learn to ignore."""
    top, bottom = rng.integers(40, 256, 3), rng.integers(0, 200, 3)
    t = np.linspace(0, 1, size)[:, None, None]
    img = (1 - t) * top + t * bottom + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.broadcast_to(img, (size, size, 3)).clip(0, 255).astype(np.uint8), "RGB")


def draw_vehicle(cls: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One image of class `cls`: random background, paint, scale, position and direction."""
    body, windows, wheels, radius = _SHAPES[cls]
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    width = size * rng.uniform(0.5, 0.9)
    height = width * (0.55 if cls in ("bus", "van") else 0.42) * rng.uniform(0.9, 1.1)
    x0 = rng.uniform(0, size - width)
    y0 = rng.uniform(size * 0.05, size - height * 1.05)
    facing_left = rng.random() < 0.5

    def place(points):
        return [(x0 + (1 - x if facing_left else x) * width, y0 + y * height) for x, y in points]

    paint = tuple(int(v) for v in rng.integers(0, 256, 3))
    draw.polygon(place(body), fill=paint, outline=(20, 20, 20))
    shade = int(rng.integers(90, 200))
    glass = (shade // 2, shade, min(255, shade + 40))  # bluish windows
    for window in windows:
        draw.polygon(place(window), fill=glass)
    r = radius * width
    for wx in wheels:
        (cx, cy), = place([(wx, 0.86)])
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(25, 25, 25))
        draw.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], fill=(170, 170, 170))
    return img


def _write_set(folder: Path, counts: dict[str, int], size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (folder / cls).mkdir(parents=True)
        for i in range(n):
            draw_vehicle(cls, rng, size).save(folder / cls / f"{cls}_{i:04d}.jpg", quality=90)
    lines = "\n".join(f"  {c}: {n}" for c, n in counts.items())
    (folder / "README.txt").write_text(README.format(seed=seed, n=sum(counts.values()), k=len(counts),
                                                     classes=", ".join(counts), size=size, counts=lines))


def make_demo(out_dir, *, n_images: int = 300, size: int = 96, seed: int = 0) -> pd.DataFrame:
    """Write the demo set into out_dir (one folder per class plus README.txt); returns class, count.

    Built in a temporary sibling folder and moved into place, so an interrupted run
    leaves no half-written class folders; existing demo class folders are replaced.
    """
    if n_images < 2 * len(CLASS_SHARES):
        raise DataError(f"--images must be at least {2 * len(CLASS_SHARES)}, got {n_images}")
    if size < 16:
        raise DataError(f"--size must be at least 16 px, got {size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = _class_counts(n_images)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        _write_set(tmp, counts, size, seed)
        for entry in sorted(tmp.iterdir()):
            target = out / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %d synthetic images in %d classes to %s", n_images, len(counts), out)
    return pd.DataFrame({"class": list(counts), "count": list(counts.values())})


def cli_demo(args) -> int:
    out = Path(args.dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"not a folder: {out}")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise DataError(f"{out} is not empty; pass --force to replace the demo class folders in it")
    table = make_demo(out, n_images=args.images, size=args.size, seed=args.seed)
    print(table.to_string(index=False))
    print(f"\n{int(table['count'].sum())} synthetic images (a pipeline check, not real photos) in {out}")
    return 0
