"""`model.finetune: top`: the last k blocks of a pretrained network and a new head trained on cached trunk activations.

    carclf train --config run.yaml --set model.finetune=top --set model.top_blocks=5 --set train.epochs=8

A network is a sequence of blocks (found by the module's type, `find_blocks`: torchvision MobileNet,
EfficientNet `features[i]`, ResNet `layer1..4`, VGG and AlexNet's conv blocks between max-pools, a timm
model's `blocks`, `stages` or `layers`). With `model.top_blocks: k` the blocks before the last k are the
frozen trunk: it runs once over each split's images, in eval mode, and its output at the cut (the input
of block n-k) is cached on disk with carclf.training.features' FeatureCache, keyed by the model, its weights'
identity, the cut, the image size, the split's content (the split array's key) and whether the images
were mirrored. The top (the last k blocks and a fresh classifier) then trains on those activations with
`fit`, its batch norms in train mode; nothing below the cut gets a gradient.

Augmentation stays exact: random crops, rotations and colour jitter act on images, before the trunk, so
they cannot apply. With `augment.strength` > 0 the trunk also reads the mirrored training images, and
each training image is drawn mirrored with the flip probability of that strength, afresh per image per
epoch (the log says so).

The run's model is the whole network (the trunk untouched, the trained top in place), logged as every
network is: `carclf predict` and `mlflow models serve` need nothing new. Retests (another seed) read the
cached activations back.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from carclf.config import RunConfig
from carclf.core.errors import ConfigError
from carclf.data.arrays import array_key, load_split
from carclf.data.inputs import DeviceBudget, derived_seed, place
from carclf.data.prepare import class_weights
from carclf.data.transforms import MAX_FLIP_P, BatchEval
from carclf.models.finetune import Blocks, find_blocks, no_blocks_message, too_many_message
from carclf.models.networks import build_model, count_parameters, model_size_mb
from carclf.models.registry import _architecture
from carclf.training.features import FeatureCache, FeatureSet, backbone_features, weights_id
from carclf.training.loop import Outcome, fit, predict_probs, seed_everything, select_device
from carclf.training.probe import FeatureBatches
from carclf.training.timing import infer_seconds, network_classes, with_infer_ms

log = logging.getLogger(__name__)

# Bump when the trunk pass changes, so old cache entries are not reused.
TOP_CACHE_VERSION = 1


# --------------------------------------------------------------------------- the block sequence and the cut


class _Cut(Exception):
    """Raised by the hook at the cut: the trunk's work is done."""


class Trunk(nn.Module):
    """Images -> the input of block `entry`: the network's own forward, stopped at the cut."""

    def __init__(self, model: nn.Module, entry: nn.Module):
        super().__init__()
        self.model, self._entry = model, [entry]  # in a list: the entry is a submodule of model already

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []

        def stop(_module, args):
            seen.append(args[0])
            raise _Cut

        handle = self._entry[0].register_forward_pre_hook(stop)
        try:
            self.model(x)
        except _Cut:
            pass
        finally:
            handle.remove()
        if not seen:
            raise RuntimeError(f"{type(self.model).__name__}'s forward never reached the cut")
        return seen[0]


class Top(nn.Module):
    """Activations at the cut -> logits: the last blocks, then what the network does after its blocks.

    It holds the network's own modules (shared, not copied): training it trains the network.
    """

    def __init__(self, model: nn.Module, found: Blocks, k: int):
        super().__init__()
        self.kind = found.kind
        self.blocks = nn.ModuleList(found.blocks[len(found.blocks) - k:])
        self._model = [model]  # not a submodule: the trunk's parameters are not the top's
        if self.kind == "timm":
            tail, head = _timm_after_blocks(model, found)
            self.tail, self.head = nn.ModuleList(tail), nn.ModuleList(head)
        elif self.kind == "resnet":
            self.pool, self.classifier = model.avgpool, model.fc
        else:  # MobileNetV2 pools functionally (adaptive average to 1x1), the others with their avgpool
            self.pool = getattr(model, "avgpool", None) or nn.AdaptiveAvgPool2d(1)
            self.classifier = model.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.kind == "timm":
            for module in self.tail:
                x = module(x)
            return self._model[0].forward_head(x)
        return self.classifier(torch.flatten(self.pool(x), 1))


def _timm_after_blocks(model: nn.Module, found: Blocks) -> tuple[list[nn.Module], list[nn.Module]]:
    """The model's children that forward_features runs after the last block (in order), and those forward_head
    uses; traced once on a small input."""
    order: list[nn.Module] = []
    handles = [child.register_forward_hook(lambda m, *_: order.append(m)) for child in model.children()]
    size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            features = model.forward_features(torch.zeros(1, 3, size, size))
            split = len(order)
            model.forward_head(features)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    last = max(i for i, m in enumerate(order[:split]) if m is found.blocks[-1] or _contains(m, found.blocks[-1]))
    return _unique(order[last + 1:split]), _unique(order[split:])


def _contains(parent: nn.Module, child: nn.Module) -> bool:
    return any(m is child for m in parent.modules())


def _unique(modules: list[nn.Module]) -> list[nn.Module]:
    out: list[nn.Module] = []
    for m in modules:
        if not any(m is x for x in out):
            out.append(m)
    return out


@dataclass
class CutNetwork:
    """One network cut before its last k blocks: the frozen trunk, the trainable top, where the cut lies."""

    model: nn.Module
    trunk: Trunk
    top: Top
    n_blocks: int
    k: int

    @property
    def cut(self) -> str:
        return f"{self.n_blocks - self.k}/{self.n_blocks}"


def cut_network(model: nn.Module, k: int, name: str = "") -> CutNetwork:
    """Freeze `model` below its last `k` blocks; the top (those blocks and the head) trains. ConfigError if it
    has no blocks carclf can find or fewer than k."""
    found = find_blocks(model)
    label = name or type(model).__name__
    if found is None:
        raise ConfigError(no_blocks_message(label))
    n = len(found.blocks)
    if not 1 <= k <= n:
        raise ConfigError(too_many_message(label, k, n))
    top = Top(model, found, k)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in top.parameters():
        p.requires_grad_(True)
    return CutNetwork(model, Trunk(model, found.entries[n - k]), top, n, k)


# --------------------------------------------------------------------------- config validation (no weights loaded)


# --------------------------------------------------------------------------- the activation cache


class _Mirrored:
    """The eval transform of horizontally mirrored images (uint8 NCHW: the last axis is the width)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        return self.transform(images.flip(-1), generator)


def trunk_key(cfg: RunConfig, images: str, split: str, cut: str, *, mirror: bool) -> dict:
    """The cache key of one split's trunk activations: what changes the numbers, and nothing else (`images`:
    split_images_key, the split's content)."""
    return {"version": TOP_CACHE_VERSION, "kind": "trunk", "split": split, "images": images,
            "model": cfg.model.name, "weights": weights_id(cfg.model.name, cfg.model.weights, seed=cfg.seed),
            "cut": cut, "image_size": cfg.data.image_size, "mirror": mirror}


def split_images_key(data, split: str) -> str:
    """The split's unique images at the data's size, named as its split array is (carclf.data.arrays), unbuilt."""

    shas = sorted(set(data.manifest.loc[data.manifest["split"] == split, "sha256"]))
    return array_key(data.cache.image_size, shas)[:40]


def trunk_pass(trunk: Trunk, placed, input_config, *, mirror: bool, batch_size: int, device: torch.device,
               progress: bool = False, desc: str = "trunk") -> np.ndarray:
    """The trunk over every image of a placed split array, in its order, plain or mirrored: float32 [n_images, D]."""

    transform = BatchEval(input_config)
    return backbone_features(trunk, _image_batches(placed, _Mirrored(transform) if mirror else transform, batch_size),
                             device=device, progress=progress, desc=desc)


def _image_batches(placed, transform, batch_size: int):
    """(transformed images, None) batches of a placed split's unique images, in order (the rows do not matter:
    balancing may leave some images out or repeat them)."""
    n = len(placed.split.images)
    for start in range(0, n, batch_size):
        index = np.arange(start, min(start + batch_size, n))
        if placed.resident is not None:
            images = placed.select(torch.as_tensor(index, device=placed.device))
        else:
            images = placed.to_device(placed.gather_host(index))
        yield transform(images.permute(0, 3, 1, 2)), None


@dataclass
class SplitActivations:
    """A split's cached activations, one row per unique image, and the split's rows into them."""

    plain: np.ndarray  # float32 [n_images, D]
    mirrored: np.ndarray | None
    image_index: np.ndarray  # int64 [n_rows]
    labels: np.ndarray  # int64 [n_rows]
    shape: tuple[int, ...]  # of one image's activations (C, H, W)
    seconds: float  # spent in the trunk (0 for entries read from the cache)
    cached: int  # entries read from the cache
    seconds_per_image: float  # the trunk's, as measured when the plain entry was made


def split_activations(cfg: RunConfig, data, split: str, cut: CutNetwork, *, mirror: bool, device: torch.device,
                      cache: FeatureCache, shape: tuple[int, ...], progress: bool = False) -> SplitActivations:
    """One split's trunk activations (and the mirrored ones if `mirror`): from the cache, else the trunk runs."""

    arr = load_split(data, split, cache_dir=cfg.data.cache_dir)
    n_images = len(arr.images)
    out, seconds, cached = {}, 0.0, 0
    placed = None
    for flipped in (False, True) if mirror else (False,):
        key = trunk_key(cfg, arr.path.stem, split, cut.cut, mirror=flipped)
        found = cache.load(key)
        if found is not None:
            out[flipped], cached = found, cached + 1
            continue
        if placed is None:
            placed = place(arr, device, DeviceBudget(cfg.train.device_data_mb), name=split)
        what = f"{split} {'mirrored ' if flipped else ''}trunk"
        log.info("%s: %s up to block %s over %d images", what, cfg.model.name, cut.cut, n_images)
        t0 = time.perf_counter()
        feats = trunk_pass(cut.trunk, placed, cut.model.input_config, mirror=flipped,
                           batch_size=cfg.train.batch_size, device=device, progress=progress, desc=what)
        spent = time.perf_counter() - t0
        seconds += spent
        # rows carry the labels; an entry holds activations per image of the split array, in its order
        found = FeatureSet(feats, np.full(n_images, -1, dtype=np.int64), [str(i) for i in range(n_images)],
                           {"shape": list(shape), "seconds": spent, "seconds_per_image": spent / max(n_images, 1)})
        cache.save(key, found)
        out[flipped] = found
    return SplitActivations(out[False].features, out[True].features if mirror else None, arr.image_index,
                            arr.labels, tuple(out[False].meta["shape"]), seconds, cached,
                            float(out[False].meta.get("seconds_per_image", 0.0)))


def activation_shape(cut: CutNetwork, image_size: int) -> tuple[int, ...]:
    """(C, H, W) of one image's activations at the cut, from one forward pass of a blank image."""
    was_training = cut.model.training
    cut.model.eval()
    try:
        with torch.inference_mode():
            device = next(cut.model.parameters()).device
            return tuple(cut.trunk(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1:])
    finally:
        cut.model.train(was_training)


# --------------------------------------------------------------------------- room for the cache, checked first


def available_ram() -> int:
    """Bytes of memory available to a new allocation (MemAvailable on Linux; free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_disk(folder: Path) -> int:
    """Free bytes on the file system of `folder` (its nearest existing parent)."""
    folder = Path(folder).resolve()
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_cache_room(cfg: RunConfig, data, splits, *, cut: str, shape: tuple[int, ...], cache: FeatureCache) -> int:
    """Refuse (ConfigError naming the settings) activations that would not fit the cache folder (those not cached
    yet) or RAM (all of them, held while the top trains); returns their bytes. Nothing has run yet."""
    mirror = cfg.augment.strength > 0
    per_image = 4 * int(np.prod(shape))
    need = write = 0
    n_total = 0
    for s in splits:
        images = split_images_key(data, s)
        n = int(data.manifest.loc[data.manifest["split"] == s, "sha256"].nunique())
        for flipped in (False, True) if mirror and s == "train" else (False,):
            need += per_image * n
            n_total += n
            if not cache.contains(trunk_key(cfg, images, s, cut, mirror=flipped)):
                write += per_image * n
    what = (f"model.finetune=top with model.top_blocks={cfg.model.top_blocks} (cut at block {cut}) at "
            f"data.image_size={cfg.data.image_size}: the trunk's activations take {need / 2**20:,.0f} MB "
            f"({per_image / 1024:,.0f} KB per image, {n_total:,} images"
            f"{' with the mirrored training images, as augment.strength > 0' if mirror else ''})")
    fix = ("lower data.image_size or model.top_blocks (a later cut has smaller activations)"
           + (", or set augment.strength to 0 (no mirrored copy)" if mirror else ""))
    disk = free_disk(cache.root)
    if write > disk:
        raise ConfigError(f"{what}, {write / 2**20:,.0f} MB of it still to write, but the cache folder {cache.root} "
                          f"has {disk / 2**20:,.0f} MB free; {fix}, or set data.cache_dir to a folder with room")
    ram = available_ram()
    if need > ram:
        raise ConfigError(f"{what}, held in memory while the top trains, but {ram / 2**20:,.0f} MB of RAM are "
                          f"available; {fix}")
    return need


def planned_shape(name: str, k: int, image_size: int) -> tuple[int, tuple[int, ...]]:
    """(blocks of network `name`, shape of one image's activations before its last k blocks), computed on the
    meta device: no weights, no memory, no arithmetic."""

    with torch.device("meta"):
        cut = cut_network(_architecture(name).network.make().eval(), k, name)
        return cut.n_blocks, tuple(cut.trunk(torch.zeros(1, 3, image_size, image_size)).shape[1:])


def check_planned_room(cfg: RunConfig, data) -> int:
    """check_cache_room for a run that has not built its network (a sweep's preflight)."""
    n, shape = planned_shape(cfg.model.name, cfg.model.top_blocks, cfg.data.image_size)
    return check_cache_room(cfg, data, ("train", "val", "test"), cut=f"{n - cfg.model.top_blocks}/{n}", shape=shape,
                            cache=activation_cache(cfg))


# --------------------------------------------------------------------------- batches of activations


class ActivationBatches(FeatureBatches):
    """(activations, labels) batches of one split, on the device; mirrored rows drawn per image per epoch.

    Each pass is one epoch: a fresh shuffled order if `shuffle` (as the probe's feature batches), and each
    row mirrored with probability `flip_p` (when mirrored activations are given), drawn from a generator
    seeded by the run's seed.
    """

    def __init__(self, acts: SplitActivations, *, batch_size: int, device: torch.device, shuffle: bool = False,
                 seed: int = 0, flip_p: float = 0.0):
        # the rows' labels; the cached activations one row per image, looked up through image_index
        super().__init__(FeatureSet(acts.plain, acts.labels, []), batch_size=batch_size, device=device,
                         shuffle=shuffle, seed=seed)
        shape = (-1, *acts.shape)
        self.plain = self.features.view(shape)
        self.mirrored = None if acts.mirrored is None else torch.tensor(acts.mirrored, device=device).view(shape)
        self.index = torch.tensor(acts.image_index, device=device)
        self.flip_p = flip_p if self.mirrored is not None else 0.0
        self._flip_gen = torch.Generator().manual_seed(derived_seed(seed, "flip"))

    def __iter__(self):
        n = self.n_rows
        order = torch.randperm(n, generator=self._order_gen) if self.shuffle else torch.arange(n)
        flips = torch.rand(n, generator=self._flip_gen) < self.flip_p if self.flip_p > 0 else None
        order = order.to(self.plain.device)
        for start in range(0, n, self.batch_size):
            rows = order[start:start + self.batch_size]
            images = self.index[rows]
            x = self.plain[images]
            if flips is not None:
                flip = flips[start:start + self.batch_size].to(x.device).view(-1, *([1] * (x.ndim - 1)))
                x = torch.where(flip, self.mirrored[images], x)
            yield x, self.labels[rows]


# --------------------------------------------------------------------------- the run


def flip_probability(cfg: RunConfig) -> float:
    """The horizontal flip's probability at the run's augmentation strength (as carclf.data.transforms draws it)."""

    return MAX_FLIP_P * cfg.augment.strength


def _say_what_applies(cfg: RunConfig) -> None:
    if cfg.augment.strength > 0:
        log.warning("model.finetune=top: of augment.strength=%g only the horizontal flip applies (p=%.3g, drawn per "
                    "image per epoch from the mirrored trunk activations); rotation, crop and colour jitter would "
                    "act on the images before the frozen trunk, whose output is cached, so they do not apply",
                    cfg.augment.strength, flip_probability(cfg))
    else:
        log.info("model.finetune=top: augment.strength=0, no augmentation")


def top_network(cfg: RunConfig, n_classes: int) -> CutNetwork:
    """The whole network with a new head, cut before its last model.top_blocks blocks (seeded, so a random-init
    trunk is the one its cache key names)."""

    seed_everything(cfg.seed)
    model = build_model(cfg.model.name, num_classes=n_classes, weights=cfg.model.weights, finetune="full",
                        image_size=cfg.data.image_size)
    return cut_network(model, cfg.model.top_blocks, cfg.model.name)


def activation_cache(cfg: RunConfig) -> FeatureCache:
    return FeatureCache(Path(cfg.data.cache_dir) / "features" if cfg.data.cache_dir else None)


def run_top(cfg: RunConfig, data, *, on_epoch, evaluate_test: bool, progress: bool):
    """The top branch of carclf.experiment.run_experiment: trunk activations (cached), the top trained, evaluated."""

    _say_what_applies(cfg)
    n = len(data.classes)
    device = select_device(cfg.train.device)
    splits = ("train", "val", "test") if evaluate_test else ("train", "val")
    cut = top_network(cfg, n)
    mirror = cfg.augment.strength > 0
    cache = activation_cache(cfg)
    shape = activation_shape(cut, cfg.data.image_size)
    check_cache_room(cfg, data, splits, cut=cut.cut, shape=shape, cache=cache)
    acts = {s: split_activations(cfg, data, s, cut, mirror=mirror and s == "train", device=device, cache=cache,
                                 shape=shape, progress=progress) for s in splits}
    batches = {s: ActivationBatches(acts[s], batch_size=cfg.train.batch_size, device=device, shuffle=s == "train",
                                    seed=cfg.seed, flip_p=flip_probability(cfg) if s == "train" else 0.0)
               for s in splits}
    weights = class_weights(data.train["label"], n) if cfg.balance.class_weights else None
    # the whole network (trunk and top) from images: not the cached activations' timing
    per_image = infer_seconds(cfg, data, network_classes(cut.model, cut.model.input_config, device,
                                                         amp=cfg.train.amp), device)
    fitted = fit(cut.top, batches["train"], batches["val"], cfg.train, n_classes=n, device=device,
                 class_weights=weights, on_epoch=with_infer_ms(on_epoch, per_image), progress=progress)
    test = predict_probs(cut.top, batches["test"], device, amp=cfg.train.amp) if evaluate_test else None
    model = cut.model.cpu().eval()  # the whole network, the trained top in place
    metadata = {"classes": data.classes, "input_config": asdict(model.input_config), "model": cfg.model.name,
                "kind": "network", "finetune": "top", "top_blocks": cfg.model.top_blocks, "cut": cut.cut,
                "weights": cfg.model.weights, "weights_sha256": getattr(model, "weights_sha256", None)}
    epoch_seconds = [r["epoch_seconds"] for r in fitted.history]
    return Outcome(model=model, history=fitted.history, val=fitted.val_output, test=test,
                    train_seconds=fitted.seconds, infer_seconds_per_image=per_image,
                    n_params=count_parameters(model), size_mb=model_size_mb(model), metadata=metadata,
                    extra_metrics={"best_epoch": fitted.best_epoch, "epochs_run": len(fitted.history),
                                   "n_params_trainable": count_parameters(cut.top, True),
                                   "trunk_seconds": sum(a.seconds for a in acts.values()),
                                   "trunk_cache_hits": sum(a.cached for a in acts.values()),
                                   "top_blocks_of": cut.n_blocks,
                                   "epoch_seconds_mean": float(np.mean(epoch_seconds))},
                    infer_ms_per_img=1000.0 * per_image)

