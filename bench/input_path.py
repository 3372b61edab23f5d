"""Benchmark the training input path: batched on the device (carclf.data.inputs) against the per-sample path before it.

    .venv/bin/python bench/input_path.py        # from the project root, no arguments

On the model10 photos (../shared/data/stanford_cars_model10) at 224 px, augmentation strength 0.5,
batch 64, balanced train split, on whatever device `train.device: auto` picks:
- input alone: images/s delivered as normalised float batches on the device by the per-sample path
  (ImageDataset + TrainPreset in a DataLoader: decode-cache file per image, PIL augmentation per image;
  what training used before) and by the batched path (one split array, index-sampled batches,
  BatchTrainAugment on whole batches);
- a train step with a small model (simple_cnn, 224 px) fed by each path;
- on CUDA only: MobileNetV2 training images/s (AMP, channels_last, fused AdamW) on synthetic tensors
  already on the GPU, the ceiling, beside the same model fed by the batched path on the real photos.
Without CUDA the RESULT line says so (cuda: false) and holds the CPU figures. Caches (decode cache,
split arrays) follow CARCLF_CACHE_DIR; the first run fills them and is not timed, and every decode-cache
file is read once before timing, so the per-sample path is measured with a warm page cache (its best case).
On a shared machine the figures move with the load: the two paths are timed in alternation, ROUNDS times,
and the medians are reported, with the CPU time this process spent per image (on CPU, where no loader
worker runs, it depends far less on other processes than wall time does) and the load average at the start.
The last line is `RESULT {json}`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "stanford_cars_model10"
IMAGE_SIZE, STRENGTH, BATCH = 224, 0.5, 64
ROUNDS = 3  # alternating timings per path; medians reported
INPUT_BATCHES = 4  # timed batches per path and round, input alone (after one untimed batch)
STEP_BATCHES = 5  # timed train steps per path and round with simple_cnn (a 224 px step on 2 CPU cores takes seconds;
# fewer let one slow step, a first allocation or a burst of load, decide the comparison)
CUDA_EPOCHS = 3  # timed epochs of MobileNetV2 on CUDA


class Take:
    """The first `n` batches of a loader, from a fresh iteration each time."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, n

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i >= self.n:
                return
            yield batch


def run_config():
    from carclf.config import validate_run_config

    return validate_run_config({
        "data": {"path": str(DATA), "image_size": IMAGE_SIZE, "min_images": 20},
        "balance": {"mode": "both"}, "augment": {"strength": STRENGTH},
        "model": {"name": "simple_cnn", "weights": "none"},
        "train": {"batch_size": BATCH, "device": "auto"}}, "benchmark config")


def per_sample_loader(cfg, data, ic, device):
    from carclf.data.prepare import ImageDataset
    from carclf.data.transforms import TrainPreset
    from carclf.training.loop import make_loader

    dataset = ImageDataset(data.train, data.cache, TrainPreset(ic, cfg.augment.strength))
    loader = make_loader(dataset, batch_size=BATCH, shuffle=True, device=device, num_workers=cfg.train.num_workers,
                         seed=cfg.seed)
    return OnDevice(loader, device)


class OnDevice:
    """A DataLoader's batches moved to the device as the training loop moved them."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __iter__(self):
        from carclf.training.loop import _to_device

        for images, labels in self.loader:
            yield _to_device(images, labels, self.device)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def input_rate(loader, device, n: int) -> tuple[float, float]:
    """(images/s, CPU ms of this process per image) delivering `n` batches, after one untimed batch."""
    batches = iter(Take(loader, n + 1))
    next(batches)  # untimed: first batch (worker start-up, first reads)
    sync(device)
    start, cpu, seen = time.perf_counter(), time.process_time(), 0
    for images, _ in batches:
        seen += len(images)
    sync(device)
    return seen / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / seen


def alternate(measure: dict, rounds: int) -> dict:
    """Each measurement `rounds` times, in alternation so that a burst of load hits both: the medians."""
    runs = {name: [] for name in measure}
    for _ in range(rounds):
        for name, fn in measure.items():
            runs[name].append(fn())
    return {name: np.median(np.asarray(values, dtype=float), axis=0).tolist() for name, values in runs.items()}


def train_rate(model, loader, device, images_per_pass: int, passes: int = 1) -> float:
    """Images/s of carclf's own training loop (train_one_epoch) over `loader`, after one untimed step."""
    from carclf.training.loop import make_optimizer, train_one_epoch

    amp = device.type == "cuda"
    optimizer = make_optimizer("adamw", model.parameters(), lr=1e-3, weight_decay=1e-4, fused=amp)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    loss = torch.nn.CrossEntropyLoss()
    train_one_epoch(model, Take(loader, 1), optimizer, loss, device, scaler=scaler, amp=amp)
    sync(device)
    start = time.perf_counter()
    for _ in range(passes):
        train_one_epoch(model, loader, optimizer, loss, device, scaler=scaler, amp=amp)
    sync(device)
    return passes * images_per_pass / (time.perf_counter() - start)


def warm_page_cache(data) -> None:
    """Read every decode-cache file of the train split once, so per-sample timings start warm."""
    for row in data.train.drop_duplicates("sha256").itertuples():
        data.cache.load(row.path, row.sha256)


def small_model(device):
    from carclf.models.networks import build_model

    model = build_model("simple_cnn", num_classes=10, weights="none", image_size=IMAGE_SIZE).to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def cuda_mobilenet(cfg, data, device) -> dict:
    """MobileNetV2 images/s: synthetic tensors on the GPU (the ceiling) and the batched real-data path."""
    from carclf.data.inputs import run_batches
    from carclf.models.networks import build_model

    def model():
        torch.manual_seed(0)
        m = build_model("mobilenet_v2", num_classes=10, weights="none", finetune="full", image_size=IMAGE_SIZE)
        return m.to(device).to(memory_format=torch.channels_last)

    real = run_batches(cfg, data, model().input_config, device, ("train",))["train"]
    steps = len(real)
    x = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,), device=device)
    synthetic = [(x, y)] * steps
    syn = train_rate(model(), synthetic, device, steps * BATCH, passes=CUDA_EPOCHS)
    rate = train_rate(model(), real, device, real.n_rows, passes=CUDA_EPOCHS)
    return {"synthetic_images_per_s": round(syn, 1), "real_images_per_s": round(rate, 1),
            "real_over_synthetic": round(rate / syn, 3), "input_path": real.images.path}


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("carclf.data.inputs").setLevel(logging.INFO)
    if not DATA.is_dir():
        print(f"real photos not found at {DATA}", file=sys.stderr)
        return 2
    from carclf.data.inputs import run_batches
    from carclf.data.prepare import prepare_data
    from carclf.training.loop import select_device

    load = os.getloadavg()[0]
    cfg = run_config()
    device = select_device(cfg.train.device)
    data = prepare_data(cfg, image_size=IMAGE_SIZE, progress=True)
    ic = small_model(torch.device("cpu")).input_config
    batched = run_batches(cfg, data, ic, device, ("train",))["train"]  # builds the split array if missing
    old = per_sample_loader(cfg, data, ic, device)

    warm_page_cache(data)
    rates = alternate({"per_sample": lambda: input_rate(old, device, INPUT_BATCHES),
                       "batched": lambda: input_rate(batched, device, INPUT_BATCHES)}, ROUNDS)
    speed = {k: v[0] for k, v in rates.items()}
    cpu_ms = {k: v[1] for k, v in rates.items()}
    print(f"input alone ({device.type}): per-sample {speed['per_sample']:.1f} img/s ({cpu_ms['per_sample']:.1f} CPU "
          f"ms/img), batched {speed['batched']:.1f} img/s ({cpu_ms['batched']:.1f} CPU ms/img)", flush=True)

    def step(loader):
        torch.manual_seed(0)  # batches are full: the train split has far more than STEP_BATCHES * BATCH rows
        return train_rate(small_model(device), Take(loader, STEP_BATCHES), device, STEP_BATCHES * BATCH)

    steps = alternate({"per_sample": lambda: step(old), "batched": lambda: step(batched)}, max(1, ROUNDS - 1))
    print(f"simple_cnn train step: per-sample {steps['per_sample']:.1f} img/s, batched {steps['batched']:.1f} img/s",
          flush=True)
    result = {
        "device": device.type, "cuda": torch.cuda.is_available(), "image_size": IMAGE_SIZE, "strength": STRENGTH,
        "batch_size": BATCH, "train_rows": len(data.train), "input_path": batched.images.path,
        "torch_threads": torch.get_num_threads(), "load_avg_1min_at_start": round(load, 2),
        "rounds": ROUNDS, "input_images_per_s": {k: round(v, 1) for k, v in speed.items()},
        "input_speedup": round(speed["batched"] / speed["per_sample"], 2),
        "input_cpu_ms_per_image": {k: round(v, 2) for k, v in cpu_ms.items()} if device.type == "cpu" else None,
        "train_step_model": "simple_cnn",
        "train_images_per_s": {k: round(v, 1) for k, v in steps.items()},
        "train_speedup": round(steps["batched"] / steps["per_sample"], 2),
    }
    if device.type == "cuda":
        result["mobilenet_v2"] = cuda_mobilenet(cfg, data, device)
        m = result["mobilenet_v2"]
        print(f"MobileNetV2: synthetic {m['synthetic_images_per_s']} img/s, real data {m['real_images_per_s']} img/s "
              f"({100 * m['real_over_synthetic']:.0f}%)")
    else:
        result["note"] = ("CUDA is not available here: CPU figures only; the MobileNetV2 synthetic vs real-data "
                          "comparison runs on a CUDA machine")
        print(result["note"])
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
