"""The batched input path (carclf/data/inputs.py): every row once per epoch, seeded, the same batches resident or streamed."""

from __future__ import annotations

import collections
import logging

import numpy as np
import pytest
import torch

from carclf.config import BalanceConfig, DataConfig, RunConfig, SplitConfig
from carclf.data import arrays
from carclf.data.inputs import DeviceBudget, SplitBatches, place
from carclf.data.prepare import ImageDataset, prepare_data
from carclf.data.transforms import BatchEval, BatchTrainAugment, EvalPreset
from carclf.models.records import InputConfig

CPU = torch.device("cpu")
IC = InputConfig(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(autouse=True)
def _fresh_memo():
    arrays.clear_memo()
    yield
    arrays.clear_memo()


def _prepare(root, mode="both", samples_per_class=8):
    cfg = RunConfig.model_construct(data=DataConfig(path=root, min_images=3), split=SplitConfig(seed=1),
                                    balance=BalanceConfig(mode=mode, samples_per_class=samples_per_class), seed=0)
    return prepare_data(cfg, image_size=32)


def _train_batches(data, *, budget_mb=64, seed=0, strength=0.5, batch_size=5) -> SplitBatches:
    placed = place(arrays.load_split(data, "train"), CPU, DeviceBudget(budget_mb), name="train")
    return SplitBatches(placed, transform=BatchTrainAugment(IC, strength), batch_size=batch_size, shuffle=True,
                        seed=seed)


def _epoch(batches):
    out = [(x.clone(), y.clone()) for x, y in batches]
    return torch.cat([x for x, _ in out]), torch.cat([y for _, y in out])


@pytest.mark.parametrize("mode, per_class", [("both", 8), ("oversample", None), ("undersample", 4)])
def test_an_epoch_visits_every_balanced_row_once(image_folder, mode, per_class):
    data = _prepare(image_folder.root, mode, per_class)
    batches = _train_batches(data)
    images, labels = _epoch(batches)
    assert len(labels) == batches.n_rows == len(data.train) and len(batches) == -(-len(data.train) // 5)
    assert collections.Counter(labels.tolist()) == collections.Counter(data.train["label"].tolist())
    assert images.shape == (len(data.train), 3, 32, 32) and images.dtype == torch.float32


def test_same_seed_same_epochs_other_seed_other_batches(image_folder):
    data = _prepare(image_folder.root)
    a, b = _train_batches(data, seed=3), _train_batches(data, seed=3)
    first_a, first_b = _epoch(a), _epoch(b)
    assert torch.equal(first_a[0], first_b[0]) and torch.equal(first_a[1], first_b[1])
    second_a = _epoch(a)
    assert not torch.equal(second_a[0], first_a[0])  # a new order and new augmentations each epoch
    assert torch.equal(second_a[0], _epoch(b)[0])
    assert not torch.equal(_epoch(_train_batches(data, seed=4))[0], first_a[0])


def test_streamed_batches_equal_resident_ones(image_folder, caplog):
    data = _prepare(image_folder.root)
    with caplog.at_level(logging.INFO, logger="carclf.data.inputs"):
        streamed, resident = _train_batches(data, budget_mb=0), _train_batches(data, budget_mb=64)
    assert resident.images.path == "cpu" and streamed.images.path == "streamed"
    assert "input path for train: cpu" in caplog.text and "input path for train: streamed" in caplog.text
    assert isinstance(streamed.images.split.images, np.memmap) and streamed.images.resident is None
    for prefetch in (False, True):
        streamed.prefetch = prefetch
        x_r, y_r = _epoch(resident)
        x_s, y_s = _epoch(streamed)
        assert torch.equal(x_r, x_s) and torch.equal(y_r, y_s)


def test_the_budget_is_shared_by_the_splits_of_a_run(image_folder):
    data = _prepare(image_folder.root)
    train, val = arrays.load_split(data, "train"), arrays.load_split(data, "val")
    budget = DeviceBudget((train.nbytes + val.nbytes - 1) / 2**20)
    assert place(train, CPU, budget).path == "cpu"
    assert place(val, CPU, budget).path == "streamed"  # what is left is not enough


def test_eval_batches_equal_the_eval_preset_in_row_order(image_folder):
    data = _prepare(image_folder.root)
    for budget_mb in (64, 0):
        placed = place(arrays.load_split(data, "val"), CPU, DeviceBudget(budget_mb))
        images, labels = _epoch(SplitBatches(placed, transform=BatchEval(IC), batch_size=4))
        reference = ImageDataset(data.val, data.cache, EvalPreset(IC))
        expected = torch.stack([reference[i][0] for i in range(len(reference))])
        torch.testing.assert_close(images, expected)
        assert labels.tolist() == data.val["label"].tolist()


def test_rows_select_and_order_a_subset(image_folder):
    data = _prepare(image_folder.root)
    placed = place(arrays.load_split(data, "train"), CPU, DeviceBudget(64))
    rows = np.flatnonzero(data.train["augmented"].to_numpy())[::-1]
    _, labels = _epoch(SplitBatches(placed, transform=BatchEval(IC), batch_size=3, rows=rows))
    assert labels.tolist() == data.train["label"].to_numpy()[rows].tolist()
