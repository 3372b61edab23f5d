"""`model.finetune: probe`: the pretrained backbone frozen and run once, a linear head trained on its cached features.

    carclf train --config run.yaml --set model.finetune=probe --set train.epochs=100

The backbone (the network up to its classifier's last layer) reads each image of the split once,
through carclf.training.features with the key an SVM on that backbone uses (`svm.backbone` = the network,
`svm.backbone_weights` = `model.weights`, `svm.features` = the feature the head reads), so an SVM
family and a probe family on the same backbone, weights, image size and data share one extraction.
The network's own head (a fresh nn.Linear) is then trained on those features with `fit`, for the
run's epochs, learning rate, batch size and weight decay, early-stopping on validation as any network
run. An epoch over ~800 cached vectors takes milliseconds, so a probe can afford a hundred epochs on a CPU.

There is no augmentation: the features are computed once. `augment.strength` is ignored (said in
the log) and fill-up copies of `balance.mode` are plain copies, so they only reweight classes.

The run's model is the network that `finetune: head` builds, its head replaced by the trained one
and its backbone untouched (batch-norm statistics included), logged like any network run.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict

import torch

from carclf.config import RunConfig
from carclf.data.inputs import derived_seed
from carclf.data.prepare import class_weights
from carclf.models.networks import build_model, count_parameters, model_size_mb
from carclf.shipped.car_classifier import network
from carclf.training.features import FeatureSet, split_features
from carclf.training.loop import Outcome, fit, predict_probs, seed_everything, select_device
from carclf.training.timing import infer_seconds, network_classes, with_infer_ms

log = logging.getLogger(__name__)


def probe_feature_mode(name: str) -> str:
    """The features network `name`'s head reads, named as an SVM names them: 'penultimate' for networks whose
    classifier has hidden layers (vgg16, alexnet), 'gap' (the pooled last conv map) for the others."""

    return "penultimate" if network(name).penultimate is not None else "gap"


def feature_config(cfg: RunConfig) -> RunConfig:
    """`cfg` as an SVM on the network's backbone sees it: the probe's features are that SVM's features.

    One pass over the train split (augment_copies 1) without augmentation (strength 0).
    """
    svm = cfg.svm.model_copy(update={"backbone": cfg.model.name, "backbone_weights": cfg.model.weights,
                                     "features": probe_feature_mode(cfg.model.name), "augment_copies": 1})
    return cfg.model_copy(update={"svm": svm, "augment": cfg.augment.model_copy(update={"strength": 0.0})})


class FeatureBatches:
    """(features, labels) batches of one split's cached features, both on the device.

    Each pass is one epoch: in a fresh shuffled order (seeded from the run's seed) if `shuffle`, else in row order.
    """

    def __init__(self, fs: FeatureSet, *, batch_size: int, device: torch.device, shuffle: bool = False,
                 seed: int = 0):
        # copies: cached features are read-only views of the parquet file's buffers
        self.features = torch.tensor(fs.features, device=device)
        self.labels = torch.tensor(fs.labels, device=device)
        self.batch_size, self.shuffle = int(batch_size), shuffle
        self._order_gen = torch.Generator().manual_seed(derived_seed(seed, "shuffle"))

    @property
    def n_rows(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        return -(-self.n_rows // self.batch_size)

    def __iter__(self):
        n = self.n_rows
        order = torch.randperm(n, generator=self._order_gen) if self.shuffle else torch.arange(n)
        order = order.to(self.features.device)
        for start in range(0, n, self.batch_size):
            rows = order[start:start + self.batch_size]
            yield self.features[rows], self.labels[rows]


def frozen_network(cfg: RunConfig, n_classes: int) -> torch.nn.Module:
    """The network `finetune: head` builds, seeded as carclf.training.features seeds its backbone, so a random-init
    ('none') backbone is the very one whose features are cached."""

    seed_everything(cfg.seed)
    return build_model(cfg.model.name, num_classes=n_classes, weights=cfg.model.weights, finetune="head",
                       image_size=cfg.data.image_size)


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """Torch on one CPU thread: the head's matrices are too small for threads to pay, and with other processes
    on the cores the thread pool waits on itself (an epoch on model10: 1.7 s with 2 threads on 2 busy cores,
    0.12 s with one). It also keeps the head's float sums independent of the thread count."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _say_what_is_ignored(cfg: RunConfig) -> None:
    if cfg.augment.strength > 0:
        copies = " (fill-up copies of balance.mode are plain copies)" if cfg.balance.mode in ("oversample",
                                                                                              "both") else ""
        log.warning("model.finetune=probe: augment.strength=%g is ignored: the frozen backbone reads each "
                    "training image once, without augmentation%s", cfg.augment.strength, copies)


def run_probe(cfg: RunConfig, data, *, on_epoch, evaluate_test: bool, progress: bool):
    """The probe branch of carclf.experiment.run_experiment: features (cached), the head trained, evaluated."""

    _say_what_is_ignored(cfg)
    n = len(data.classes)
    device = select_device(cfg.train.device)
    splits = ("train", "val", "test") if evaluate_test else ("train", "val")
    sets = split_features(feature_config(cfg), data, device=device, splits=splits, progress=progress)
    model = frozen_network(cfg, n)
    head = model.get_submodule(network(cfg.model.name).head)
    batches = {s: FeatureBatches(sets[s], batch_size=cfg.train.batch_size, device=device, shuffle=s == "train",
                                 seed=cfg.seed) for s in splits}
    weights = class_weights(data.train["label"], n) if cfg.balance.class_weights else None
    # the whole network (backbone and head) from images, on the run's threads: not the cached features' timing
    per_image = infer_seconds(cfg, data, network_classes(model, model.input_config, device, amp=cfg.train.amp),
                              device)
    with _one_thread(device):
        fitted = fit(head, batches["train"], batches["val"], cfg.train, n_classes=n, device=device,
                     class_weights=weights, on_epoch=with_infer_ms(on_epoch, per_image), progress=progress)
        test = predict_probs(head, batches["test"], device, amp=cfg.train.amp) if evaluate_test else None
    model.cpu().eval()  # the whole network on the CPU
    extraction = sum(s.meta.get("seconds", 0.0) for s in sets.values() if not s.meta.get("cached"))
    metadata = {"classes": data.classes, "input_config": asdict(model.input_config), "model": cfg.model.name,
                "kind": "network", "finetune": "probe", "weights": cfg.model.weights,
                "weights_sha256": getattr(model, "weights_sha256", None)}
    return Outcome(model=model, history=fitted.history, val=fitted.val_output, test=test,
                    train_seconds=fitted.seconds, infer_seconds_per_image=per_image,
                    n_params=count_parameters(model), size_mb=model_size_mb(model), metadata=metadata,
                    extra_metrics={"best_epoch": fitted.best_epoch, "epochs_run": len(fitted.history),
                                   "n_params_trainable": count_parameters(head), "feature_seconds": extraction,
                                   "feature_cache_hits": sum(bool(s.meta.get("cached")) for s in sets.values()),
                                   "feature_dim": sets["train"].features.shape[1]},
                    infer_ms_per_img=1000.0 * per_image)
