"""The inference module shipped inside every model: it decodes, normalises and rebuilds networks exactly as
carclf trains them, answers per image (errors included), and loads only what it trusts."""

from __future__ import annotations

import base64
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import encode, random_image

from carclf.data.transforms import EvalPreset
from carclf.models.networks import build_backbone, build_model
from carclf.models.records import InputConfig
from carclf.models.registry import MODELS, is_network
from carclf.shipped import car_classifier as cc


def _jpeg(seed: int, size=(40, 24)) -> bytes:
    return encode(random_image(seed, size=size), "JPEG")


def test_normalisation_is_the_training_eval_preset():
    ic = InputConfig(size=20, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    images = np.stack([cc.decode_image(_jpeg(i), ic.size) for i in range(3)])
    expected = torch.stack([EvalPreset(ic)(img) for img in images])
    assert torch.equal(cc.normalise(images, ic.mean, ic.std), expected)


@pytest.mark.parametrize("name", [n for n in sorted(MODELS) if is_network(n)])
def test_every_registered_network_is_rebuilt_by_the_shipped_module(name):
    # Built on the meta device: shapes only, no time spent on weights.
    with torch.device("meta"):
        trained = build_model(name, num_classes=7, weights="none", finetune="full", image_size=64)
        rebuilt = cc.build_network(name, 7, **trained.build_kwargs)
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in (trained, rebuilt)]
    assert shapes[0] == shapes[1]


def test_rank_classes_orders_by_probability_breaks_ties_in_class_order_and_caps_k():
    names, values = cc.rank_classes(np.array([[0.1, 0.7, 0.2], [0.4, 0.2, 0.4]]), ["bus", "van", "sedan"], k=5)
    assert names == [["van", "sedan", "bus"], ["bus", "sedan", "van"]]
    assert values == [[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]]


@pytest.fixture
def tiny_classifier(tmp_path) -> cc.CarClassifier:
    """A random-init simple_cnn saved and loaded the way a logged model is (spec + state_dict)."""
    torch.manual_seed(0)
    net = build_model("simple_cnn", num_classes=3, weights="none", image_size=16)
    spec = {"version": cc.SPEC_VERSION, "kind": "network", "classes": ["bus", "van", "sedan"],
            "input_config": {"size": 16, "mean": [0.5] * 3, "std": [0.5] * 3}, "architecture": "simple_cnn"}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    return cc.load_classifier({"spec": str(tmp_path / "spec.json"), "weights": str(tmp_path / "weights.pt")})


def test_a_broken_image_gets_an_error_row_and_the_others_are_still_predicted(tiny_classifier):
    good = [_jpeg(1), encode(random_image(2, mode="RGBA"), "PNG"), _jpeg(3, size=(300, 120))]
    truncated = good[2][: len(good[2]) // 2]
    batch = [good[0], b"not an image", good[1], None, truncated, good[2]]
    out = tiny_classifier.predict(pd.DataFrame({"image": pd.Series(batch, dtype=object)}), top_k=2)
    alone = tiny_classifier.predict(pd.DataFrame({"image": good}), top_k=2)
    assert list(out.columns) == list(cc.OUTPUT_COLUMNS) and len(out) == len(batch)
    failed = out["error"] != ""
    assert failed.tolist() == [False, True, False, True, True, False]
    assert "cannot identify image file" in out["error"][1] and "BytesIO" not in out["error"][1]
    assert out["error"][3] == "ValueError: no image bytes"
    assert out.loc[failed, "class"].isna().all() and out.loc[failed, "top_classes"].map(len).eq(0).all()
    assert out.loc[~failed, "class"].tolist() == alone["class"].tolist()
    assert np.allclose(out.loc[~failed, "probability"].astype(float), alone["probability"])


def test_base64_strings_are_read_as_the_bytes_they_encode(tiny_classifier):
    photos = [_jpeg(i) for i in range(3)]
    as_bytes = tiny_classifier.predict(pd.DataFrame({"image": photos}))
    as_text = tiny_classifier.predict(pd.DataFrame({"image": [base64.b64encode(p).decode() for p in photos]}))
    pd.testing.assert_frame_equal(as_bytes, as_text)
    assert as_bytes["top_probabilities"].map(len).eq(3).all()


def test_bad_requests_are_refused_naming_what_is_wrong(tiny_classifier):
    with pytest.raises(ValueError, match="column 'image'"):
        tiny_classifier.predict(pd.DataFrame({"photo": [_jpeg(0)]}))
    with pytest.raises(ValueError, match="top_k"):
        tiny_classifier.predict(pd.DataFrame({"image": [_jpeg(0)]}), top_k=0)


def test_svm_files_are_loaded_only_with_the_modules_own_trusted_types(tmp_path):
    import operator

    import skops.io
    from sklearn.preprocessing import FunctionTransformer

    x, y = np.random.default_rng(0).random((30, 4)), np.arange(30) % 3
    pipe = build_model("svm", num_classes=3, cv=2).fit(x, y)
    skops.io.dump(pipe, tmp_path / "svm.skops")
    assert np.array_equal(cc.load_svm(str(tmp_path / "svm.skops")).predict(x), pipe.predict(x))
    skops.io.dump(FunctionTransformer(operator.neg), tmp_path / "other.skops")
    with pytest.raises(Exception, match="_operator.neg"):  # skops' UntrustedTypesFoundException
        cc.load_svm(str(tmp_path / "other.skops"))


def test_svm_backbone_weights_round_trip_into_the_shipped_feature_extractor(tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone("mobilenet_v2", weights="none", image_size=32)
    torch.save(backbone.state_dict(), tmp_path / "w.pt")
    shipped = cc._with_weights(lambda: cc.FeatureExtractor(cc.feature_trunk("mobilenet_v2",
                                                                           cc.build_network("mobilenet_v2"))),
                               cc.load_state_dict(str(tmp_path / "w.pt")))
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(shipped(x), backbone(x))

