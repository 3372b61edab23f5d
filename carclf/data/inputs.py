"""The batched input path: a split's images placed on the device once, batches index-sampled and transformed there.

    budget = DeviceBudget(cfg.train.device_data_mb)
    images = place(load_split(data, "train", cache_dir=cfg.data.cache_dir), device, budget, name="train")
    train = SplitBatches(images, transform=BatchTrainAugment(ic, 0.5), batch_size=64, shuffle=True, seed=cfg.seed)
    for x, y in train: ...      # x: float NCHW, normalised, on `device`; y: int64 labels on `device`

Where a split's images live (logged per split):
- device-resident: on CUDA (or MPS), a split within the budget goes to the GPU as uint8 once per run;
  a batch is an `index_select` there and nothing crosses the bus per batch.
- streamed: a split over the budget stays memory-mapped on disk; each batch is gathered on the host
  into pinned memory (CUDA) and copied without blocking, the next batch gathered on a thread meanwhile.
- cpu: the split in RAM (one read, memoised by carclf.data.arrays), batches gathered there.
Augmentation and normalisation run on the batch where it is (carclf.data.transforms.BatchTrainAugment), with
parameters drawn per image from a torch.Generator on that device; the shuffle order comes from a CPU
generator. Both are seeded from the run's seed, so a CPU run repeats exactly.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from carclf.data.arrays import SplitArray, in_memory, load_split
from carclf.data.transforms import BatchEval, BatchTrainAugment

log = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class DeviceBudget:
    """Bytes of split images one run may keep on its device (or, on CPU, in RAM); the rest is streamed."""

    def __init__(self, megabytes: float):
        self.left = int(megabytes * 2**20)

    def take(self, nbytes: int) -> bool:
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True

    def give_back(self, nbytes: int) -> None:
        self.left += nbytes


@dataclass
class PlacedImages:
    """One split's images where batches are drawn from: whole on `device`, or streamed from the memmap."""

    split: SplitArray
    device: torch.device
    resident: torch.Tensor | None  # (n_images, S, S, 3) uint8 on `device`; None when streamed
    path: str  # "device-resident", "streamed" or "cpu"

    def select(self, image_index: torch.Tensor) -> torch.Tensor:
        """A resident split's uint8 NHWC images for one batch (indices on the device)."""
        return self.resident.index_select(0, image_index)

    def gather_host(self, image_index: np.ndarray) -> torch.Tensor:
        """The batch's images copied out of the memory-mapped file (into pinned memory for CUDA)."""
        shape = (len(image_index), *self.split.images.shape[1:])
        buf = torch.empty(shape, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        # mode='clip' lets numpy write straight into `out` (the default mode buffers); indices are valid.
        np.take(self.split.images, image_index, axis=0, out=buf.numpy(), mode="clip")
        return buf

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        # Pinned blocks return to torch's host cache only after the copy that reads them has finished.
        return host.to(self.device, non_blocking=True) if self.device.type != "cpu" else host


def place(split: SplitArray, device: torch.device, budget: DeviceBudget, *, name: str = "split") -> PlacedImages:
    """Put a split's images on the device if they fit the budget, else leave them to be streamed."""
    mb = split.nbytes / 2**20
    if budget.take(split.nbytes):
        host = torch.from_numpy(in_memory(split))
        if device.type == "cpu":
            log.info("input path for %s: cpu (%d images, %.0f MB in RAM)", name, len(split.images), mb)
            return PlacedImages(split, device, host, "cpu")
        try:
            resident = host.to(device)
        except torch.OutOfMemoryError:
            budget.give_back(split.nbytes)
            log.warning("input path for %s: %.0f MB do not fit on %s next to what is there; streaming instead",
                        name, mb, device)
        else:
            log.info("input path for %s: device-resident on %s (%d images, %.0f MB)", name, device,
                     len(split.images), mb)
            return PlacedImages(split, device, resident, "device-resident")
    else:
        log.info("input path for %s: streamed to %s from %s (%.0f MB, over the budget of %.0f MB left)", name, device,
                 split.path, mb, budget.left / 2**20)
    return PlacedImages(split, device, None, "streamed")


def derived_seed(seed: int, purpose: str) -> int:
    """A seed for one purpose (shuffle, augment) derived from the run's seed, so the streams differ."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}".encode()).digest()[:8], "little") >> 1


class SplitBatches:
    """Batches of (some) rows of a placed split: (transformed float NCHW images, int64 labels), both on the device.

    Each pass over it is one epoch: in a fresh shuffled order if `shuffle`, else in row order;
    the last batch may be smaller. `rows` selects and orders the split's rows (default: all).
    """

    def __init__(self, images: PlacedImages, *, transform: Transform, batch_size: int, rows=None,
                 shuffle: bool = False, seed: int = 0, prefetch: bool | None = None):
        split, device = images.split, images.device
        rows = np.arange(len(split)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.images, self.transform, self.batch_size, self.shuffle = images, transform, int(batch_size), shuffle
        self.image_index = split.image_index[rows]
        self.labels = split.labels[rows]
        self._labels = torch.from_numpy(self.labels).to(device)
        self._index = torch.from_numpy(self.image_index).to(device) if images.resident is not None else None
        self._order_gen = torch.Generator().manual_seed(derived_seed(seed, "shuffle"))
        self.generator = torch.Generator(device=device).manual_seed(derived_seed(seed, "augment"))
        # A background gather pays off while a GPU computes; on CPU it would compete with the model for cores.
        self.prefetch = device.type == "cuda" if prefetch is None else prefetch

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    @property
    def n_rows(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self._order_gen) if self.shuffle else torch.arange(n)
        on_device = order.to(self.images.device, non_blocking=True)  # once per epoch, not per batch
        starts = range(0, n, self.batch_size)
        if self.images.resident is not None:
            for s in starts:
                sel = on_device[s:s + self.batch_size]
                yield self._batch(self.images.select(self._index[sel]), sel)
            return
        chunks = [self.image_index[order[s:s + self.batch_size].numpy()] for s in starts]
        for s, host in zip(starts, self._host_batches(chunks)):
            yield self._batch(self.images.to_device(host), on_device[s:s + self.batch_size])

    def _host_batches(self, chunks: list[np.ndarray]) -> Iterator[torch.Tensor]:
        if not self.prefetch:
            yield from (self.images.gather_host(c) for c in chunks)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="carclf-prefetch") as pool:
            pending = pool.submit(self.images.gather_host, chunks[0]) if chunks else None
            for k in range(len(chunks)):
                host = pending.result()
                pending = pool.submit(self.images.gather_host, chunks[k + 1]) if k + 1 < len(chunks) else None
                yield host

    def _batch(self, images_nhwc: torch.Tensor, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(images_nhwc.permute(0, 3, 1, 2), self.generator), self._labels[sel]


def run_batches(cfg, data, input_config, device: torch.device, splits, *,
                budget: DeviceBudget | None = None) -> dict[str, SplitBatches]:
    """A run's batches per split: train shuffled and augmented by `cfg.augment.strength`, others as the eval preset."""

    budget = budget if budget is not None else DeviceBudget(cfg.train.device_data_mb)
    out = {}
    for name in splits:
        placed = place(load_split(data, name, cache_dir=cfg.data.cache_dir), device, budget, name=name)
        train = name == "train"
        transform = BatchTrainAugment(input_config, cfg.augment.strength) if train else BatchEval(input_config)
        out[name] = SplitBatches(placed, transform=transform, batch_size=cfg.train.batch_size, shuffle=train,
                                 seed=cfg.seed, prefetch=prefetch_setting(cfg.train.num_workers))
    return out


def prefetch_setting(num_workers: int | None) -> bool | None:
    """train.num_workers for the batched path: None is auto (a prefetch thread on CUDA), 0 none, more: one."""
    return None if num_workers is None else num_workers > 0

