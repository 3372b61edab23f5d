"""Benchmark the decode cache: images/s decoding the model10 photos at 224 px vs loading them warm.

    .venv/bin/python bench/decode_cache.py            # from the project root; target ratio >= 20

1. decode: read each JPEG and decode + resize it to 224x224 RGB on one thread (what
   every run would pay without a cache; PIL draft mode already on).
2. fill: `scan_folder` into a fresh, empty cache folder (hash, decode, store; a few threads).
3. warm: a second `scan_folder` on the warm cache (a stat per file, hashes from the index)
   plus `DecodeCache.load` of every image, i.e. the whole data step of a later run.
The last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from carclf.data.cache import DecodeCache, decode_image
from carclf.data.scan import scan_folder

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stanford_cars_model10"


def decode_all(paths: list[str], size: int) -> float:
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            decode_image(f.read(), size)
    return time.perf_counter() - start


def warm_load(data: Path, cache_root: Path, size: int) -> float:
    start = time.perf_counter()
    cache = DecodeCache(cache_root, size)  # a fresh object: nothing is held in memory between runs
    scan = scan_folder(data, cache=cache)
    for path, sha in zip(scan.items["path"], scan.items["sha256"]):
        cache.load(path, sha)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="warm passes (the median is reported)")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"data folder not found: {args.data}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="carclf-bench-") as tmp:
        cache_root = Path(tmp) / "decode"
        start = time.perf_counter()
        scan = scan_folder(args.data, cache=DecodeCache(cache_root, args.size))
        fill_s = time.perf_counter() - start
        paths = scan.items["path"].tolist()
        n = len(paths)
        decode_s = decode_all(paths, args.size)
        warm_s = statistics.median(warm_load(args.data, cache_root, args.size) for _ in range(args.repeats))
    result = {"n_images": n, "image_size": args.size, "decode_img_s": round(n / decode_s, 1),
              "fill_img_s": round(n / fill_s, 1), "warm_img_s": round(n / warm_s, 1),
              "ratio": round(decode_s / warm_s, 1)}
    print(f"{n} images at {args.size} px")
    print(f"decode (1 thread):        {result['decode_img_s']:>9.1f} img/s  ({decode_s:.2f} s)")
    print(f"fill empty cache (scan):  {result['fill_img_s']:>9.1f} img/s  ({fill_s:.2f} s, threads, incl. hashing)")
    print(f"warm (scan + load all):   {result['warm_img_s']:>9.1f} img/s  ({warm_s:.3f} s, median of {args.repeats})")
    print(f"warm / decode:            {result['ratio']:>9.1f}x")
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
