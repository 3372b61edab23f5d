"""Training the networks: device choice, seeds, optimisers, one epoch, evaluation and `fit` with early stopping.

    device = select_device("auto")
    result = fit(model, train_loader, val_loader, cfg.train, n_classes=10, device=device)
    result.history[-1]["val_f1_macro"], result.best_epoch

`fit` stops when validation macro-F1 has not improved for `patience` epochs and
leaves the model holding the best epoch's weights.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from carclf.config import TrainConfig
from carclf.core.errors import ConfigError
from carclf.core.metrics import classification_metrics

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict], None]

# The metric early stopping and model selection look at (the study compares macro-F1 on imbalanced classes).
SELECTION_METRIC = "val_f1_macro"


def check_device(pref: str) -> None:
    """An explicit train.device this machine lacks is a ConfigError naming it (torch would fail mid-run)."""
    mps = getattr(torch.backends, "mps", None)
    present = {"cuda": torch.cuda.is_available(), "mps": mps is not None and mps.is_available()}
    if not present.get(pref, True):
        raise ConfigError(f"train.device={pref}, but torch finds no {pref.upper()} device on this machine "
                          f"(torch.{'cuda' if pref == 'cuda' else 'backends.mps'}.is_available() is False); "
                          "set train.device to auto or cpu")


def select_device(pref: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit choice is honoured as given (checked first)."""
    if pref != "auto":
        check_device(pref)
        return torch.device(pref)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _adamw(params, *, lr: float, weight_decay: float, fused: bool = False) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def _sgd(params, *, lr: float, weight_decay: float, fused: bool = False) -> torch.optim.Optimizer:
    # Nesterov momentum 0.9: the usual transfer-learning recipe (torchvision references).
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay,
                           fused=fused or None)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"adamw": _adamw, "sgd": _sgd}


def make_optimizer(name: str, params, *, lr: float, weight_decay: float, fused: bool = False) -> torch.optim.Optimizer:
    """An optimiser from the registry over the parameters that require gradients.

    `fused` (for CUDA) also lets a GradScaler skip its per-step host sync: a fused optimiser checks
    for inf/NaN gradients on the device instead of asking the host.
    """
    try:
        factory = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(sorted(OPTIMIZERS))}") from None
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    return factory(trainable, lr=lr, weight_decay=weight_decay, fused=fused)


def loader_options(device: torch.device, num_workers: int | None = None) -> dict:
    """DataLoader settings per device: workers and pinned memory pay off only when a GPU waits for data."""
    on_cuda = device.type == "cuda"
    if num_workers is None:
        # On CPU the model competes with workers for the same (few) cores, so load in the main process.
        num_workers = 4 if on_cuda else 0
    opts = {"num_workers": num_workers, "pin_memory": on_cuda}
    if num_workers > 0:
        opts["persistent_workers"] = True
    return opts


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, device: torch.device,
                num_workers: int | None = None, seed: int = 0) -> DataLoader:
    """A DataLoader with device-appropriate settings; the shuffle order follows `seed`."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      **loader_options(device, num_workers))


def _to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device):
    # channels_last for image batches on CUDA; a probe's feature batches are 2-d
    memory_format = torch.channels_last if device.type == "cuda" and images.ndim == 4 else torch.contiguous_format
    images = images.to(device, non_blocking=True, memory_format=memory_format)
    return images, labels.to(device, non_blocking=True)


def _autocast(device: torch.device, amp: bool):
    # Mixed precision only on CUDA: CPU autocast (bfloat16) is slower than float32 on most CPUs.
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                    device: torch.device, *, scaler: torch.amp.GradScaler | None = None, amp: bool = False,
                    progress: bool = False) -> dict:
    """One pass over `loader` (a DataLoader or carclf.data.inputs.SplitBatches); {'loss', 'accuracy'} averaged over samples.

    Loss and correct counts add up on the device: the host waits for the GPU once per epoch, not per batch.
    """
    model.train()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for images, labels in _maybe_tqdm(loader, progress, "train"):
        images, labels = _to_device(images, labels, device)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            logits = model(images)
            loss = loss_fn(logits, labels)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n = labels.shape[0]
        total_loss += loss.detach().double() * n
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += n
    if seen == 0:
        raise ValueError("the training loader yielded no batches")
    return {"loss": total_loss.item() / seen, "accuracy": correct.item() / seen}


@dataclass
class EvalOutput:
    """What `evaluate` saw: true labels, predicted labels and class probabilities (rows sum to 1)."""

    y_true: np.ndarray
    y_pred: np.ndarray
    probs: np.ndarray


def predict_probs(model: nn.Module, loader: Iterable, device: torch.device, *, amp: bool = False,
                  progress: bool = False) -> EvalOutput:
    """Softmax probabilities for every sample of `loader`, in loader order, without gradients.

    Outputs stay on the device until the loop ends: one transfer to the host, not one per batch.
    """
    model.eval()
    labels_out, probs_out = [], []
    with torch.inference_mode():
        for images, labels in _maybe_tqdm(loader, progress, "eval"):
            images, labels = _to_device(images, torch.as_tensor(labels), device)
            with _autocast(device, amp):
                logits = model(images)
            probs_out.append(torch.softmax(logits.float(), dim=1))
            labels_out.append(labels)
    if not probs_out:
        return EvalOutput(y_true=np.zeros(0, dtype=np.int64), y_pred=np.zeros(0, dtype=np.int64),
                          probs=np.zeros((0, 0), dtype=np.float32))
    probs = torch.cat(probs_out).cpu().numpy()
    y_true = torch.cat(labels_out).cpu().numpy().astype(np.int64)
    return EvalOutput(y_true=y_true, y_pred=probs.argmax(1), probs=probs)


def cross_entropy(out: EvalOutput) -> float:
    """Mean cross-entropy of the true classes (no label smoothing or class weights: the plain validation loss)."""
    picked = out.probs[np.arange(len(out.y_true)), out.y_true]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, None))))


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, *, n_classes: int, amp: bool = False,
             progress: bool = False) -> tuple[dict, EvalOutput]:
    """Classification metrics (see carclf.core.metrics) and the raw predictions of `model` on `loader`."""
    out = predict_probs(model, loader, device, amp=amp, progress=progress)
    if len(out.y_true) == 0:
        raise ValueError("the evaluation loader yielded no samples")
    metrics = classification_metrics(out.y_true, out.y_pred, scores=out.probs, n_classes=n_classes)
    return metrics, out


@dataclass
class FitResult:
    """The outcome of `fit`: per-epoch history and the epoch whose weights the model now holds."""

    history: list[dict]
    best_epoch: int
    best_metrics: dict  # the history row of the best epoch
    val_output: EvalOutput  # validation predictions of the best epoch
    stopped_early: bool
    seconds: float


def make_loss(*, label_smoothing: float, class_weights=None, device: torch.device) -> nn.Module:
    """Cross-entropy with optional label smoothing and per-class weights (inverse frequency)."""
    weight = None
    if class_weights is not None:
        weight = torch.as_tensor(np.asarray(class_weights), dtype=torch.float32, device=device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


def _snapshot(model: nn.Module) -> dict:
    # A CPU copy, so keeping the best weights does not hold a second model's worth of GPU memory.
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def fit(model: nn.Module, train_loader: Iterable, val_loader: Iterable, cfg: TrainConfig, *, n_classes: int,
        device: torch.device, class_weights=None, on_epoch: EpochCallback | None = None,
        progress: bool = False) -> FitResult:
    """Train for up to `cfg.epochs` epochs, early-stopping on validation macro-F1 with `cfg.patience`.

    `on_epoch(epoch, row)` gets each epoch's history row (train_loss, train_accuracy, val_<metric>...);
    whatever it raises propagates (the sweep stops a trial that way). On return the model holds
    the weights of the best epoch.
    """
    amp = cfg.amp and device.type == "cuda"
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        # Batch shapes repeat every epoch: let cuDNN pick its fastest convolution algorithms once per shape.
        torch.backends.cudnn.benchmark = True
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                               fused=device.type == "cuda")
    loss_fn = make_loss(label_smoothing=cfg.label_smoothing, class_weights=class_weights, device=device)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    state = _EarlyStopping(cfg.patience)
    history: list[dict] = []
    start = time.perf_counter()
    for epoch in _maybe_trange(cfg.epochs, progress):
        t0 = time.perf_counter()
        train = train_one_epoch(model, train_loader, optimizer, loss_fn, device, scaler=scaler, amp=amp)
        val, val_out = evaluate(model, val_loader, device, n_classes=n_classes, amp=amp)
        row = {"epoch": epoch, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
               "val_loss": cross_entropy(val_out), **{f"val_{k}": v for k, v in val.items()},
               "epoch_seconds": time.perf_counter() - t0}
        history.append(row)
        log.info("epoch %d: train_loss %.4f val_f1_macro %.4f", epoch, row["train_loss"], row[SELECTION_METRIC])
        state.update(epoch, row, model, val_out)
        if on_epoch is not None:
            on_epoch(epoch, dict(row))
        if state.should_stop:
            log.info("early stop after epoch %d (best epoch %d)", epoch, state.best_epoch)
            break
    model.load_state_dict(state.best_weights)
    return FitResult(history=history, best_epoch=state.best_epoch, best_metrics=state.best_row,
                     val_output=state.best_output, stopped_early=state.should_stop and len(history) < cfg.epochs,
                     seconds=time.perf_counter() - start)


class _EarlyStopping:
    """Tracks the best epoch by validation macro-F1 and counts epochs without improvement."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best_score = -float("inf")
        self.best_epoch = 0
        self.best_row: dict = {}
        self.best_weights: dict = {}
        self.best_output: EvalOutput | None = None
        self.bad_epochs = 0

    def update(self, epoch: int, row: dict, model: nn.Module, output: EvalOutput) -> None:
        score = row[SELECTION_METRIC]
        # The first epoch always counts, so a NaN score still leaves weights to restore.
        if self.best_epoch == 0 or score > self.best_score:
            self.best_score, self.best_epoch, self.best_row = score, epoch, row
            self.best_weights, self.best_output = _snapshot(model), output
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


def _maybe_tqdm(iterable, progress: bool, desc: str):
    if not progress:
        return iterable

    return tqdm(iterable, desc=desc, leave=False)


def _maybe_trange(epochs: int, progress: bool):
    epochs_range = range(1, epochs + 1)
    if not progress:
        return epochs_range

    return tqdm(epochs_range, desc="epochs", unit="epoch")


@dataclass
class Outcome:
    """What a run's branch (network, probe, top or SVM) hands back to carclf.experiment for evaluation and logging."""

    model: Any
    history: list[dict]
    val: Any  # training.EvalOutput
    test: Any | None
    train_seconds: float
    infer_seconds_per_image: float
    n_params: int
    size_mb: float
    metadata: dict
    extra_metrics: dict
    infer_ms_per_img: float = float("nan")  # carclf.training.timing's, on validation images: a trial has it without test
    backbone: Any = None  # an SVM's feature backbone, as measured and as its logged model ships it
