"""Training loop: device choice, optimiser registry, epochs, evaluation and early stopping with best weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from carclf.config import TrainConfig
from carclf.training import loop as training
from carclf.training.loop import (
    EvalOutput,
    evaluate,
    fit,
    loader_options,
    make_loss,
    make_optimizer,
    seed_everything,
    select_device,
    train_one_epoch,
)

CPU = torch.device("cpu")


def blobs(n_per_class: int = 20, n_classes: int = 3, dim: int = 4, seed: int = 0) -> TensorDataset:
    """Well separated Gaussian blobs: a linear model reaches perfect accuracy in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(n_classes, dim) * 6
    x = torch.cat([centres[c] + torch.randn(n_per_class, dim, generator=g) * 0.3 for c in range(n_classes)])
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    return TensorDataset(x, y)


def loaders(seed: int = 0):
    train = DataLoader(blobs(seed=seed), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))
    val = DataLoader(blobs(n_per_class=5, seed=seed + 1), batch_size=8)
    return train, val


def test_select_device_prefers_cuda_then_cpu_and_honours_explicit_choice():
    assert select_device("cpu") == CPU
    auto = select_device("auto")
    expected = "cuda" if torch.cuda.is_available() else auto.type
    assert auto.type == expected and auto.type in ("cuda", "mps", "cpu")


def test_optimizer_registry_builds_each_and_skips_frozen_parameters():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    adamw = make_optimizer("adamw", model.parameters(), lr=0.01, weight_decay=0.1)
    sgd = make_optimizer("sgd", model.parameters(), lr=0.01, weight_decay=0.0)
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(sgd, torch.optim.SGD)
    trained = {id(p) for group in adamw.param_groups for p in group["params"]}
    assert trained == {id(p) for p in model[1].parameters()}
    assert adamw.param_groups[0]["weight_decay"] == 0.1 and sgd.param_groups[0]["momentum"] == 0.9


def test_unknown_optimizer_names_the_allowed_ones():
    with pytest.raises(ValueError, match="adamw, sgd"):
        make_optimizer("rmsprop", nn.Linear(2, 2).parameters(), lr=0.1, weight_decay=0)


def test_loader_options_use_workers_and_pinned_memory_only_on_cuda():
    assert loader_options(CPU) == {"num_workers": 0, "pin_memory": False}
    cuda = loader_options(torch.device("cuda"))
    assert cuda["pin_memory"] and cuda["num_workers"] > 0 and cuda["persistent_workers"]
    assert loader_options(CPU, 2)["persistent_workers"]


def test_loss_carries_class_weights_and_label_smoothing():
    loss = make_loss(label_smoothing=0.1, class_weights=np.array([0.5, 2.0]), device=CPU)
    assert torch.equal(loss.weight, torch.tensor([0.5, 2.0])) and loss.label_smoothing == 0.1
    logits, target = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1])
    weighted = loss(logits, target)
    plain = make_loss(label_smoothing=0.1, device=CPU)(logits, target)
    # The two samples have equal plain loss, so the weighted mean equals the plain mean.
    assert torch.isclose(weighted, plain)


def test_train_one_epoch_lowers_the_loss_and_evaluate_reports_aligned_outputs():
    seed_everything(0)
    train, val = loaders()
    model = nn.Linear(4, 3)
    opt = make_optimizer("adamw", model.parameters(), lr=0.05, weight_decay=0)
    loss_fn = nn.CrossEntropyLoss()
    first = train_one_epoch(model, train, opt, loss_fn, CPU)
    for _ in range(5):
        last = train_one_epoch(model, train, opt, loss_fn, CPU)
    assert set(first) == {"loss", "accuracy"} and last["loss"] < first["loss"]
    metrics, out = evaluate(model, val, CPU, n_classes=3)
    assert metrics["f1_macro"] == 1.0 and metrics["accuracy"] == 1.0
    assert out.probs.shape == (15, 3) and np.allclose(out.probs.sum(1), 1, atol=1e-5)
    assert np.array_equal(out.y_true, val.dataset.tensors[1].numpy())
    assert np.array_equal(out.y_pred, out.probs.argmax(1))


def test_fit_reports_every_epoch_and_learns():
    seed_everything(0)
    train, val = loaders()
    seen = []
    cfg = TrainConfig(epochs=4, lr=0.05, patience=10)
    result = fit(nn.Linear(4, 3), train, val, cfg, n_classes=3, device=CPU, on_epoch=lambda e, m: seen.append((e, m)))
    assert [e for e, _ in seen] == [1, 2, 3, 4] and len(result.history) == 4
    assert {"train_loss", "train_accuracy", "val_f1_macro", "val_accuracy"} <= set(seen[0][1])
    assert result.history[-1]["val_f1_macro"] == 1.0


def test_fit_early_stops_and_restores_the_best_epochs_weights(monkeypatch):
    """Validation F1 peaks at epoch 2; with patience 2 training stops after epoch 4 holding epoch 2's weights."""
    scores = iter([0.5, 0.9, 0.6, 0.4, 0.95, 0.95])

    def scripted_evaluate(model, loader, device, *, n_classes, amp=False, progress=False):
        y = np.zeros(3, dtype=np.int64)
        return {"f1_macro": next(scores), "accuracy": 0.5}, EvalOutput(y, y, np.full((3, n_classes), 1 / n_classes))

    monkeypatch.setattr(training, "evaluate", scripted_evaluate)
    train, val = loaders()
    model = nn.Linear(4, 3)
    snapshots = {}

    def keep(epoch, row):
        snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    cfg = TrainConfig(epochs=6, lr=0.1, patience=2)
    result = fit(model, train, val, cfg, n_classes=3, device=CPU, on_epoch=keep)
    assert result.best_epoch == 2 and len(result.history) == 4 and result.stopped_early
    assert result.best_metrics["val_f1_macro"] == 0.9
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[2][k])
    # The weights did move after the best epoch, so restoring them was needed.
    assert not torch.equal(snapshots[4]["weight"], snapshots[2]["weight"])


def test_fit_passes_callback_errors_through():
    train, val = loaders()

    def stop(epoch, row):
        raise RuntimeError("trial stopped")

    with pytest.raises(RuntimeError, match="trial stopped"):
        fit(nn.Linear(4, 3), train, val, TrainConfig(epochs=3), n_classes=3, device=CPU, on_epoch=stop)


def test_same_seed_gives_the_same_weights():
    def run():
        seed_everything(7)
        train, val = loaders(seed=7)
        model = nn.Linear(4, 3)
        fit(model, train, val, TrainConfig(epochs=2, patience=5), n_classes=3, device=CPU)
        return model.weight.detach().clone()

    assert torch.equal(run(), run())
