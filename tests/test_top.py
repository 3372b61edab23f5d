"""`model.finetune: top`: the last blocks and a new head trained on cached activations of the frozen trunk, the
whole network logged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torchvision.models as tvm
from mlflow.tracking import MlflowClient

from carclf import cli
from carclf.config import ConfigError, RunConfig, validate_run_config
from carclf.experiment import run_experiment
from carclf.models import finetune
from carclf.training import top
from carclf.training.loop import make_loss, make_optimizer, train_one_epoch

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"

# One network of every kind the block finder knows, small enough for a test (timm through `blocks` and `stages`).
NETWORKS = {"mobilenet_v2": tvm.mobilenet_v2, "efficientnet_b0": tvm.efficientnet_b0, "resnet18": tvm.resnet18,
            "alexnet": tvm.alexnet, "mobilenet_v3_small": tvm.mobilenet_v3_small,
            "timm/efficientnet_b0": lambda: timm.create_model("efficientnet_b0"),
            "timm/convnext_atto": lambda: timm.create_model("convnext_atto")}


def top_config(demo_dir, augment: float = 0.0, weights: str = "none", **train) -> RunConfig:
    return RunConfig.model_validate({
        "data": {"path": str(demo_dir), "image_size": 32}, "balance": {"mode": "none"},
        "augment": {"strength": augment},
        "model": {"name": "mobilenet_v2", "weights": weights, "finetune": "top", "top_blocks": 3},
        "train": {"epochs": 3, "batch_size": 16, "lr": 1e-2, "patience": 3, **train},
        "tracking": {"experiment": "test"}})


@pytest.fixture
def trunk_passes(monkeypatch) -> list[tuple[int, bool]]:
    """Every pass of a trunk over a split's images: (images, mirrored), in order."""
    seen: list[tuple[int, bool]] = []
    real = top.trunk_pass

    def counting(trunk, placed, input_config, *, mirror, **kw):
        seen.append((len(placed.split.images), mirror))
        return real(trunk, placed, input_config, mirror=mirror, **kw)

    monkeypatch.setattr(top, "trunk_pass", counting)
    return seen


@pytest.mark.parametrize("name", NETWORKS)
def test_the_top_on_the_trunk_is_the_whole_network(name):
    """Cut anywhere, the trunk then the top compute exactly the network's own forward; the top holds no trunk
    parameter, and the trunk's are frozen."""
    torch.manual_seed(0)
    model = NETWORKS[name]().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        whole = model(x)
        n = len(finetune.find_blocks(model).blocks)
        for k in (1, 2, n):
            cut = top.cut_network(model, k, name)
            assert cut.n_blocks == n
            assert torch.equal(cut.top(cut.trunk(x)), whole), (name, k)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in cut.top.parameters()}  # the last cut: k = n


def test_gradients_reach_only_the_top_and_its_batch_norms_train():
    torch.manual_seed(0)
    cut = top.cut_network(tvm.mobilenet_v2(num_classes=4).eval(), 3)
    with torch.no_grad():
        acts = cut.trunk(torch.randn(8, 3, 64, 64))
    trunk_before = {k: v.clone() for k, v in cut.model.features[:16].state_dict().items()}
    top_bn = cut.top.blocks[0].conv[1][1]
    running = top_bn.running_mean.clone()
    batches = [(acts, torch.tensor([0, 1, 2, 3] * 2))]
    optimizer = make_optimizer("adamw", cut.model.parameters(), lr=1e-2, weight_decay=0.0)
    train_one_epoch(cut.top, batches, optimizer, make_loss(label_smoothing=0.0, device=torch.device("cpu")),
                    torch.device("cpu"))
    top_ids = {id(p) for p in cut.top.parameters()}
    assert all(p.grad is not None for p in cut.top.parameters())
    assert all(p.grad is None and not p.requires_grad for p in cut.model.parameters() if id(p) not in top_ids)
    # the trunk, batch-norm statistics included, is bitwise what it was; the top's batch norms ran in train mode
    after = cut.model.features[:16].state_dict()
    assert all(torch.equal(after[k], v) for k, v in trunk_before.items())
    assert not torch.equal(top_bn.running_mean, running)


def test_the_trunk_runs_once_per_split_and_once_for_the_mirror(demo_dir, tracked, trunk_passes):
    """The first run fills the cache (train, mirrored train, val, test); a retest with another seed and learning
    rate reads every split back (ImageNet weights: the seed does not change the trunk)."""
    run_experiment(top_config(demo_dir, augment=0.5, weights="imagenet"), log_model=False)
    assert [m for _, m in trunk_passes] == [False, True, False, False]
    assert trunk_passes[0][0] == trunk_passes[1][0]  # the mirror covers the same train images
    cfg = top_config(demo_dir, augment=0.5, weights="imagenet", lr=3e-3).model_copy(update={"seed": 7})
    second = run_experiment(cfg, log_model=False)
    assert len(trunk_passes) == 4
    metrics = MlflowClient().get_run(second.run_id).data.metrics
    assert metrics["trunk_cache_hits"] == 4 and metrics["trunk_seconds"] == 0
    # another cut is another entry: the trunk runs again
    other = top_config(demo_dir, weights="imagenet")
    run_experiment(other.model_copy(update={"model": other.model.model_copy(update={"top_blocks": 2})}),
                   log_model=False)
    assert [m for _, m in trunk_passes[4:]] == [False, False, False]


def test_the_mirrored_cache_is_the_trunk_on_flipped_images(demo_dir, tracked):
    from carclf.data.arrays import in_memory, load_split
    from carclf.data.prepare import prepare_data
    from carclf.data.transforms import BatchEval

    cfg = top_config(demo_dir, augment=1.0, weights="imagenet")
    data = prepare_data(cfg, image_size=32)
    cut = top.top_network(cfg, len(data.classes))
    shape = top.activation_shape(cut, 32)
    acts = top.split_activations(cfg, data, "train", cut, mirror=True, device=torch.device("cpu"),
                                 cache=top.activation_cache(cfg), shape=shape)
    images = torch.from_numpy(in_memory(load_split(data, "train"))).permute(0, 3, 1, 2)
    with torch.inference_mode():
        plain = cut.trunk(BatchEval(cut.model.input_config)(images))
        mirrored = cut.trunk(BatchEval(cut.model.input_config)(images.flip(-1)))
    assert np.allclose(acts.plain.reshape(plain.shape), plain.numpy(), rtol=1e-4, atol=1e-6)
    assert np.allclose(acts.mirrored.reshape(plain.shape), mirrored.numpy(), rtol=1e-4, atol=1e-6)
    assert not np.allclose(acts.mirrored, acts.plain, rtol=1e-2, atol=1e-3)


def test_flips_are_drawn_per_image_per_epoch():
    n, shape = 64, (2, 3, 3)
    plain = torch.randn(n, 18, generator=torch.Generator().manual_seed(0))
    acts = top.SplitActivations(plain.numpy(), (-plain).numpy(), np.arange(n), np.zeros(n, dtype=np.int64), shape,
                                0.0, 0, 0.0)
    batches = top.ActivationBatches(acts, batch_size=16, device=torch.device("cpu"), flip_p=0.5)
    epochs = []
    for _ in range(2):
        rows = torch.cat([x for x, _ in batches]).view(n, -1)
        mirrored = (rows == -plain).all(1)  # the mirrored cache is the negated one here
        assert bool((mirrored | (rows == plain).all(1)).all())  # each row is its image, plain or mirrored
        assert 16 < int(mirrored.sum()) < 48  # about half, independently per image
        epochs.append(mirrored)
    assert not torch.equal(epochs[0], epochs[1])  # drawn afresh each epoch
    none = top.ActivationBatches(acts, batch_size=16, device=torch.device("cpu"))
    assert torch.equal(torch.cat([x for x, _ in none]).view(n, -1), plain)


@pytest.mark.slow  # a run that logs its model, then loads it back through carclf's check: about 30 s on 2 cores
def test_the_logged_model_predicts_from_photos_what_the_run_evaluated(demo_dir, tracked):
    from carclf.data.prepare import prepare_data
    from carclf.serving.model_check import load_checked_model

    cfg = top_config(demo_dir, augment=0.5)
    result = run_experiment(cfg)
    run = MlflowClient().get_run(result.run_id)
    assert run.data.params["model.finetune"] == "top" and run.data.params["model.top_blocks"] == "3"
    checked, meta = load_checked_model(f"runs:/{result.run_id}/model")
    assert meta["kind"] == "network" and meta["model"] == "mobilenet_v2" and meta["finetune"] == "top"
    paths = prepare_data(cfg, image_size=32).test["path"].tolist()
    logged = checked.predict(pd.DataFrame({"image": [Path(p).read_bytes() for p in paths]}))
    assert logged["class"].tolist() == [result.classes[i] for i in result.pred_test]
    assert np.allclose(logged["probability"].astype(float), result.probs_test.max(1), atol=1e-5)


@pytest.mark.parametrize(("model", "top_blocks", "says"), [
    ("mobilenet_v2", 20, "mobilenet_v2 has 19 blocks, so top_blocks must be 1 to 19"),
    ("resnet18", 5, "resnet18 has 4 blocks"),
    ("simple_cnn", 1, "simple_cnn has no block sequence"),
    ("svm", 1, "'svm' is not a network"),
])
def test_bad_settings_are_refused_naming_the_field(model, top_blocks, says):
    with pytest.raises(ConfigError, match=r"run\.yaml:\n  model: ") as err:
        validate_run_config({"model": {"name": model, "finetune": "top", "top_blocks": top_blocks}}, "run.yaml")
    assert says in str(err.value)


def test_carclf_train_refuses_more_blocks_than_the_network_has(demo_dir, monkeypatch, capsys):
    import carclf.experiment

    monkeypatch.setattr(carclf.experiment, "run_experiment", lambda *a, **k: pytest.fail("must not train"))
    code = cli.main(["train", "--config", str(Path(__file__).resolve().parents[1] / "examples" / "run_cnn.yaml"),
                     "--set", "model.name=mobilenet_v2", "--set", "model.finetune=top", "--set", "model.top_blocks=30"])
    err = capsys.readouterr().err
    assert code == 2 and "model.top_blocks=30" in err and "Traceback" not in err


def test_a_sweep_searching_too_many_blocks_is_refused_before_ray_starts():
    from sweeps.search.spec import validate_sweep_spec

    sweep = {"base": {"data": {"path": "demo_data"}}, "models": {"top": {
        "model": "mobilenet_v2", "config": {"model": {"finetune": "top"}}, "space": {"top_blocks": {"low": 2,
                                                                                                     "high": 25}}}}}
    with pytest.raises(ConfigError, match=r"models\.top\.space\.top_blocks: 25 is not allowed .*top_blocks must be 1 "
                                          r"to 19"):
        validate_sweep_spec(sweep, "x.yaml")
    sweep["models"]["top"]["space"]["top_blocks"] = {"choices": [2, 5]}
    assert validate_sweep_spec(sweep, "x.yaml").model_params("top")["top_blocks"].choices == [2, 5]


def test_a_cache_that_does_not_fit_is_refused_before_the_trunk_runs(demo_dir, tracked, trunk_passes, monkeypatch):
    monkeypatch.setattr(top, "free_disk", lambda folder: 1000)
    with pytest.raises(ConfigError, match=r"model\.top_blocks=3 .* has 0 MB free; lower data\.image_size or "
                                          r"model\.top_blocks .* data\.cache_dir"):
        run_experiment(top_config(demo_dir, augment=0.5), log_model=False)
    monkeypatch.setattr(top, "free_disk", lambda folder: 2**40)
    monkeypatch.setattr(top, "available_ram", lambda: 1000)
    with pytest.raises(ConfigError, match=r"held in memory while the top trains"):
        run_experiment(top_config(demo_dir), log_model=False)
    assert trunk_passes == []


def test_a_sweep_whose_activations_do_not_fit_is_refused_before_ray_starts(demo_dir, monkeypatch):
    from carclf.core.errors import SweepError
    from sweeps.run.preflight import preflight
    from sweeps.search.spec import validate_sweep_spec

    spec = validate_sweep_spec({
        "base": {"data": {"path": str(demo_dir), "image_size": 32}, "balance": {"mode": "none"}},
        "models": {"top": {"model": "mobilenet_v2", "config": {"model": {"weights": "none", "finetune": "top"}},
                           "space": {"top_blocks": {"choices": [2, 4]}}}},
        "scheduler": {"grace_period": 1}}, "x.yaml")
    preflight(spec)  # fits
    monkeypatch.setattr(top, "available_ram", lambda: 1000)
    with pytest.raises(SweepError, match=r"models\.top: model\.finetune=top with model\.top_blocks=2 \(cut at block "
                                         r"17/19\) .* with the mirrored training images"):
        preflight(spec)
