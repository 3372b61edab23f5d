"""Sweeps, the sweep file: checked before anything starts (naming the field); the space is conditional on the model."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import yaml

from carclf.config import ConfigError
from sweeps.search.spec import SearchSpace, load_sweep_spec, validate_sweep_spec

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


def _minimal(**over) -> dict:
    spec = {"base": {"data": {"image_size": 32}},
            "models": {"simple_cnn": {"space": {"epochs": 2}},
                       "svm": {"space": {"kernel": {"choices": ["linear", "rbf"]}}}}}
    spec.update(over)
    return spec


@pytest.mark.parametrize("name", ["quickstart", "toyota", "model10", "pareto"])
def test_shipped_sweeps_are_valid(name):
    spec = load_sweep_spec(SWEEPS / f"{name}.yaml")
    assert spec.metric == "val_f1_macro" and spec.mode == "max"
    assert len(spec.models) >= 3


def test_toyota_packs_small_trials_on_one_gpu():
    spec = load_sweep_spec(SWEEPS / "toyota.yaml")
    assert {spec.model_name(k) for k in spec.models} == {"vgg16", "alexnet", "timm/convnext_tiny.fb_in22k_ft_in1k",
                                                         "simple_cnn", "svm"}
    assert spec.models["vgg16"].resources.gpu == 1
    assert 0 < spec.models["svm_rbf"].resources.gpu < 1


@pytest.mark.parametrize("change, field", [
    ({"num_sample": 3}, "num_sample"),
    ({"metric": "val_loss"}, "metric"),
    ({"max_concurrent_trials": 0}, "max_concurrent_trials"),
    ({"models": {}}, "models"),
    ({"models": {"resnet99": {}}}, "models.resnet99"),
    ({"models": {"svm": {"space": {"lr": 0.1}}}}, "models.svm.space.lr"),
    ({"models": {"simple_cnn": {"space": {"C": 1.0}}}}, "models.simple_cnn.space.C"),
    ({"models": {"simple_cnn": {"space": {"lr": {"low": 0.1, "high": 0.01}}}}}, "models.simple_cnn.space.lr"),
    ({"models": {"simple_cnn": {"space": {"batch_size": {"choices": [8, 0]}}}}}, "models.simple_cnn.space.batch_size"),
    ({"models": {"simple_cnn": {"resources": {"gpu": 1.5}}}}, "models.simple_cnn.resources.gpu"),
    ({"base": {"train": {"lr": -1}}}, "base.train.lr"),
    ({"space": {"augment_strength": {"choices": [0.5, 2.0]}}}, "space.augment_strength"),
    ({"scheduler": {"grace_period": 0}}, "scheduler.grace_period"),
    ({"metric": ["val_f1_macro", "latency"], "mode": ["max", "min"]}, "metric"),
    ({"metric": ["val_f1_macro", "size_mb"], "mode": "max"}, "mode"),
    ({"metric": ["val_f1_macro", "size_mb"], "mode": ["max"]}, "mode"),
    ({"metric": "val_f1_macro", "mode": ["max", "min"]}, "mode"),
    ({"metric": ["val_f1_macro", "size_mb", "infer_ms_per_img"], "mode": ["max", "min", "min"]}, "metric"),
    ({"metric": ["size_mb", "val_f1_macro"], "mode": ["min", "max"]}, "metric"),
    ({"metric": ["val_f1_macro", "val_f1_macro"], "mode": ["max", "max"]}, "metric"),
    ({"models": {"svm": {"space": {"backbone": {"choices": ["mobilenet_v2", "resnet99"]}}}}},
     "models.svm.space.backbone"),
    ({"models": {"svm": {"space": {"backbone": "svm"}}}}, "models.svm.space.backbone"),
])
def test_bad_sweep_files_are_rejected_naming_the_field(tmp_path, change, field):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_minimal(**change)))
    with pytest.raises(ConfigError) as e:
        load_sweep_spec(path)
    assert field in str(e.value)


@pytest.mark.parametrize("change, first_line", [
    ({"models": {"svm": {"space": {"C": {"low": 100, "high": 0.1}}}}},
     "models.svm.space.C: low (100.0) must be below high (0.1) (read as a range)"),
    ({"models": {"svm": {"space": {"C": {"low": 1}}}}}, "models.svm.space.C.high: Field required (read as a range)"),
    ({"models": {"svm": {"space": {"gamma": {"low": 1, "high": 0.5, "scale": True}}}}},
     "models.svm.space.gamma: low (1.0) must be below high (0.5) (read as a range)"),
    ({"models": {"svm": {"space": {"kernel": "poly"}}}},
     "models.svm.space.kernel: Input should be 'linear', 'rbf' or 'logistic' (got 'poly') (read as a constant)"),
    ({"models": {"svm": {"space": {"kernel": {"choices": []}}}}},
     "models.svm.space.kernel.choices: List should have at least 1 item"),
    ({"models": {"simple_cnn": {"space": {"epochs": {"low": 5, "high": 2}}}}},
     "models.simple_cnn.space.epochs: low (5) must be below high (2) (read as a range)"),
    ({"models": {"simple_cnn": {"space": {"lr": "fast"}}}},
     "models.simple_cnn.space.lr: Input should be a valid number, unable to parse string as a number (got 'fast')"),
    ({"space": {"augment_strength": {"low": 0.9, "high": 0.1}}},
     "space.augment_strength: low (0.9) must be below high (0.1) (read as a range)"),
    ({"base": {"svm": {"gamma": "auto"}}}, "base.svm.gamma: gamma must be 'scale' or a positive number (got 'auto')"),
])
def test_a_union_field_reports_the_problem_of_the_form_it_was_given_in(change, first_line):
    """A range, a list of choices or a constant: the error is the one of the form the value has, alone."""
    with pytest.raises(ConfigError) as e:
        validate_sweep_spec(_minimal(**change), "s.yaml")
    problems = str(e.value).splitlines()[1:]
    assert problems[0].strip().startswith(first_line), str(e.value)
    assert len(problems) == 1, str(e.value)  # no complaint per branch of the union


@pytest.mark.parametrize("change, expected", [
    ({"models": {"alexnet": {"space": {"epochs": 2}}}},
     "models.alexnet: data.image_size 32 is below the minimum of alexnet (63 px); set base.data.image_size "
     "(or models.alexnet.config.data.image_size) to at least 63"),
    ({"models": {"svm": {"config": {"svm": {"backbone": "alexnet"}}}}},
     "models.svm: data.image_size 32 is below the minimum of alexnet (63 px)"),
    ({"models": {"svm": {"config": {"svm": {"backbone": "resnet99"}}}}}, "svm.backbone: unknown backbone 'resnet99'"),
    ({"scheduler": {"grace_period": 3}},
     "scheduler.grace_period: 3 is above the most epochs any network trial runs (simple_cnn: 2); lower "
     "scheduler.grace_period to at most 2, or raise train.epochs"),
    ({"scheduler": {"grace_period": 3, "max_t": 2}}, "scheduler.grace_period: 3 exceeds scheduler.max_t 2"),
])
def test_impossible_sweeps_are_refused_when_loaded_with_the_family_field_and_fix(change, expected):
    with pytest.raises(ConfigError) as e:
        validate_sweep_spec(_minimal(**change), "s.yaml")
    assert expected in str(e.value)


def test_grace_period_within_some_networks_epochs_is_accepted():
    spec = validate_sweep_spec(_minimal(models={"simple_cnn": {"space": {"epochs": {"choices": [2, 6]}}},
                                                "cnn_short": {"model": "simple_cnn", "space": {"epochs": 1}}},
                                        scheduler={"grace_period": 4}))
    assert spec.network_epochs() == {"simple_cnn": 6, "cnn_short": 1} and spec.max_epochs() == 6


def test_missing_sweep_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_sweep_spec(tmp_path / "nope.yaml")


def _alias_bomb(levels: int) -> str:
    """A YAML list whose aliases expand to 9**levels values while the text stays a few hundred characters."""
    anchors = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    anchors += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return "[" + ", ".join(anchors) + "]"


def test_an_alias_bomb_is_refused_quickly_naming_the_file(tmp_path):
    import time

    text = yaml.safe_dump(_minimal(), sort_keys=False) + f"num_samples: {_alias_bomb(9)}\n"
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"bomb.yaml expands to more than") as err:
        load_sweep_spec(path)
    assert time.monotonic() - start < 5 and len(str(err.value)) < 500


def test_a_large_wrong_value_is_shown_shortened(tmp_path):
    path = tmp_path / "nested.yaml"
    path.write_text(yaml.safe_dump(_minimal(), sort_keys=False) + f"num_samples: {_alias_bomb(3)}\n")
    with pytest.raises(ConfigError, match="num_samples: Input should be a valid integer") as err:
        load_sweep_spec(path)
    assert len(str(err.value)) < 300 and "..." in str(err.value)


def test_an_alias_bomb_in_a_set_override_is_refused():
    from carclf.config import parse_overrides

    with pytest.raises(ConfigError, match="--set data.classes expands to more than"):
        parse_overrides([f"data.classes={_alias_bomb(9)}"])


class _Trial:
    """The part of optuna.Trial a define-by-run space uses, drawing from a seeded generator."""

    def __init__(self, seed):
        import random

        self.rng, self.params = random.Random(seed), {}

    def suggest_categorical(self, name, choices):
        return self.params.setdefault(name, self.rng.choice(choices))

    def suggest_float(self, name, low, high, log=False):
        return self.params.setdefault(name, self.rng.uniform(low, high))

    def suggest_int(self, name, low, high, step=1, log=False):
        return self.params.setdefault(name, self.rng.randrange(low, high + 1, step))


def test_space_is_conditional_on_the_model():
    spec = validate_sweep_spec(_minimal(models={
        "cnn": {"model": "simple_cnn", "space": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "epochs": 3}},
        "svm": {"space": {"kernel": {"choices": ["linear", "rbf"]},
                          "gamma": {"low": 1e-3, "high": 1.0, "log": True}}}},
        space={"augment_strength": {"choices": [0.0, 0.5]}}))
    space = SearchSpace(spec)
    seen = collections.Counter()
    for seed in range(40):
        trial = _Trial(seed)
        params = space(trial)
        cfg = spec.run_config(params)
        key = params["model"]
        names = {n.split(".", 1)[1] for n in params if n != "model"}
        if key == "cnn":
            assert names == {"lr", "epochs", "augment_strength"}
            assert cfg.model.name == "simple_cnn" and cfg.train.lr == params["cnn.lr"] and cfg.train.epochs == 3
        else:
            kernel = params["svm.kernel"]
            assert names == ({"kernel", "C", "augment_strength"} | ({"gamma"} if kernel == "rbf" else set()))
            assert cfg.svm.kernel == kernel and cfg.svm.C == params["svm.C"]
        assert cfg.augment.strength == params[f"{key}.augment_strength"]
        seen[(key, params.get("svm.kernel"))] += 1
    assert len(seen) == 3  # cnn, linear SVM, RBF SVM all drawn


def test_one_trials_parameters_never_leak_into_the_next():
    spec = validate_sweep_spec(_minimal(base={"data": {"image_size": 32}, "augment": {"strength": 0.0}},
                                        space={"augment_strength": {"choices": [0.0, 0.3]}},
                                        models={"simple_cnn": {"space": {"epochs": 2}},
                                                "svm": {"space": {"augment_strength": 0.0}}}))
    before = spec.model_dump()
    spec.run_config({"model": "simple_cnn", "simple_cnn.augment_strength": 0.3, "simple_cnn.lr": 0.05})
    svm = spec.run_config({"model": "svm", "svm.C": 1.0, "svm.kernel": "rbf", "svm.augment_strength": 0.0})
    assert svm.augment.strength == 0.0 and svm.train.lr != 0.05
    assert spec.model_dump() == before


def test_seeded_sampler_proposes_the_same_trials():
    import optuna

    spec = load_sweep_spec(SWEEPS / "quickstart.yaml")

    def proposals(seed):
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
        out = []
        for i in range(6):
            trial = study.ask()
            out.append(SearchSpace(spec)(trial))
            study.tell(trial, float(i % 3))
        return out

    assert proposals(3) == proposals(3)
    assert proposals(3) != proposals(4)


def test_two_objectives_the_first_drives_selection():
    spec = validate_sweep_spec(_minimal(metric=["val_f1_macro", "infer_ms_per_img"], mode=["max", "min"]))
    assert (spec.metric, spec.mode) == ("val_f1_macro", "max")  # ASHA, the running best, report and promote
    assert spec.objective_names == ["val_f1_macro", "infer_ms_per_img"] and spec.objective_modes == ["max", "min"]
    assert spec.multi_objective


def test_a_single_objective_file_reads_as_before():
    spec = validate_sweep_spec(_minimal(metric="val_accuracy", mode="max"))
    assert (spec.metric, spec.mode, spec.objectives) == ("val_accuracy", "max", ())
    assert spec.objective_names == ["val_accuracy"] and not spec.multi_objective
    listed = validate_sweep_spec(_minimal(metric=["val_accuracy"], mode=["max"]))
    assert (listed.metric, listed.mode, listed.objectives) == ("val_accuracy", "max", ())


def test_the_svm_backbone_is_a_searched_choice():
    spec = validate_sweep_spec(_minimal(models={"svm": {"space": {
        "kernel": "linear", "backbone": {"choices": ["mobilenet_v2", "resnet18", "efficientnet_b0", "vgg16"]}}}}))
    seen = set()
    for seed in range(30):
        params = SearchSpace(spec)(_Trial(seed))
        cfg = spec.run_config(params)
        assert cfg.svm.backbone == params["svm.backbone"]
        seen.add(cfg.svm.backbone)
    assert seen == {"mobilenet_v2", "resnet18", "efficientnet_b0", "vgg16"}


def test_gamma_factor_is_searched_for_rbf_trials_only_and_never_with_a_numeric_gamma():
    spec = validate_sweep_spec(_minimal(models={"svm": {"space": {
        "kernel": {"choices": ["linear", "rbf"]}, "gamma_factor": {"low": 0.1, "high": 10.0, "log": True}}}}))
    kernels = set()
    for seed in range(20):
        params = SearchSpace(spec)(_Trial(seed))
        cfg = spec.run_config(params)
        kernels.add(cfg.svm.kernel)
        if cfg.svm.kernel == "rbf":
            assert cfg.svm.gamma == "scale" and cfg.svm.gamma_factor == params["svm.gamma_factor"]
        else:
            assert "svm.gamma_factor" not in params and cfg.svm.gamma_factor == 1.0
    assert kernels == {"linear", "rbf"}
    with pytest.raises(ConfigError, match="models.svm.space.*gamma and gamma_factor: search one of them"):
        validate_sweep_spec(_minimal(models={"svm": {"space": {"gamma": {"low": 1e-3, "high": 1.0},
                                                               "gamma_factor": {"low": 0.1, "high": 10.0}}}}))
    with pytest.raises(ConfigError, match=r"svm.gamma=0.01 and svm.gamma_factor=0.1"):
        validate_sweep_spec(_minimal(base={"data": {"image_size": 32}, "svm": {"gamma": 0.01}},
                                     models={"svm": {"space": {"gamma_factor": {"low": 0.1, "high": 10.0}}}}))


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")),
                         ids=lambda p: p.name)
def test_each_shipped_sweep_file_has_its_default_trials_inside_the_searched_space(path):
    # A default outside the space still runs, but Optuna cannot learn from it (and, for the SVMs, it costs
    # its own feature extraction): the shipped files keep every family's default inside.
    from sweeps.search.defaults import default_trial

    spec = load_sweep_spec(path)
    for key in spec.models:
        assert default_trial(spec, key).outside == [], (path.name, key)


def test_a_logistic_kernel_draws_no_gamma_as_a_linear_one_does():
    import optuna

    spec = validate_sweep_spec({"base": {"svm": {"backbone": "mobilenet_v2"}}, "models": {"svm": {"space": {
        "kernel": {"choices": ["logistic", "rbf"]}, "gamma_factor": {"low": 0.1, "high": 10.0, "log": True}}}}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = [spec.space_fn()(study.ask()) for _ in range(12)]
    assert {d["svm.kernel"] for d in drawn} == {"logistic", "rbf"}
    assert all(("svm.gamma_factor" in d) == (d["svm.kernel"] == "rbf") for d in drawn)
