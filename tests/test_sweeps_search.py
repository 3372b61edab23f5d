"""One family's search: its first draws after its default cover its space (Sobol points) before TPE models it."""

from __future__ import annotations

import math

from sweeps.run.budget import budget_search
from sweeps.search.family import COVER_MAX, COVER_MIN, cover_points, cover_size
from sweeps.search.spec import validate_sweep_spec

BASE = {"data": {"image_size": 32}, "svm": {"backbone": "simple_cnn", "backbone_weights": "none"}}
C = {"low": 1.0e-3, "high": 1.0e+4, "log": True}
GAMMA = {"low": 0.01, "high": 10.0, "log": True}


def _spec(space: dict, **over):
    return validate_sweep_spec({"base": BASE, "models": {"rbf": {"model": "svm", "space": space}}, **over})


def _quadrant(c: float, g: float) -> tuple[bool, bool]:
    """Which half of each log range a point lies in."""
    mid_c = (math.log10(C["low"]) + math.log10(C["high"])) / 2
    mid_g = (math.log10(GAMMA["low"]) + math.log10(GAMMA["high"])) / 2
    return math.log10(c) > mid_c, math.log10(g) > mid_g


def test_the_first_draws_of_a_2d_log_space_leave_no_quadrant_of_the_log_box_empty():
    spec = _spec({"kernel": "rbf", "C": C, "gamma_factor": GAMMA}, num_samples=20)
    assert cover_size(spec, "rbf") == 4
    for seed in range(5):  # any sampler seed: the cover is a net, not luck
        searcher = budget_search(spec.model_copy(update={"seeds": spec.seeds.model_copy(update={"sampler": seed})}))
        drawn = []
        for i in range(5):  # the default, then the family's first draws
            config = searcher.suggest(f"t{i}")
            drawn.append(config)
            # a bad score everywhere: the draws must not follow results, they cover the box
            searcher.on_trial_complete(f"t{i}", {"val_f1_macro": 0.1})
        assert drawn[0]["baseline"] and not any(d.get("baseline") for d in drawn[1:])
        quadrants = {_quadrant(d["rbf.C"], d["rbf.gamma_factor"]) for d in drawn[1:]}
        assert len(quadrants) == 4, (seed, drawn)


def test_the_cover_is_sized_to_the_dimensions():
    one = _spec({"kernel": "rbf", "C": C, "gamma_factor": 1.0})
    three = _spec({"kernel": "rbf", "C": C, "gamma_factor": GAMMA, "samples_per_class": {"choices": [10, 20]}})
    none = _spec({"kernel": "rbf", "C": 1.0})  # only constants
    assert (cover_size(one, "rbf"), cover_size(three, "rbf"), cover_size(none, "rbf")) == (COVER_MIN, 8, 0)
    assert COVER_MAX == 8 and cover_points(none, "rbf", 4, 0) == []
    # a 1-D range in quarters: one draw in each quarter of its log span
    quarters = {min(3, int((math.log10(p["rbf.C"]) + 3) / 7 * 4)) for p in cover_points(one, "rbf", 4, seed=3)}
    assert quarters == {0, 1, 2, 3}
    # a sweep file's n_startup_trials, when larger, raises it
    assert cover_size(_spec({"kernel": "rbf", "C": C}, n_startup_trials=6), "rbf") == 6
