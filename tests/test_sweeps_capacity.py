"""Sweeps, capacity: a trial no node of the cluster can hold is refused before anything starts, naming the fix."""

import pytest

from carclf.core.errors import SweepError
from sweeps.run.capacity import GIB, check_capacity
from sweeps.search.spec import validate_sweep_spec

CPU_ONLY = [{"CPU": 2.0, "memory": 16 * GIB}]


def _spec(**resources):
    models = {"simple_cnn": {"space": {"epochs": 1}},
              "svm": {"space": {"kernel": "linear"}, "resources": resources}}
    return validate_sweep_spec({"base": {"data": {"image_size": 32}}, "models": models})


def test_what_fits_one_node_passes():
    assert check_capacity(_spec(cpu=2, memory_gb=8), CPU_ONLY) == []
    two_nodes = [{"CPU": 4.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert check_capacity(_spec(cpu=8, gpu=1), two_nodes) == []


@pytest.mark.parametrize("resources, message", [
    ({"gpu": 1}, r"models\.svm\.resources\.gpu: each trial asks for 1 GPU, but the largest node has 0 GPU "
                 r"\(1 node\(s\)\); set models\.svm\.resources\.gpu: 0"),
    ({"gpu": 0.25}, r"models\.svm\.resources\.gpu: .*0\.25 GPU"),
    ({"cpu": 3}, r"models\.svm\.resources\.cpu: each trial asks for 3 CPU, but the largest node has 2 CPU.*"
                 r"lower models\.svm\.resources\.cpu to 2 or less"),
    ({"memory_gb": 32}, r"models\.svm\.resources\.memory_gb: each trial asks for 32\.0 GiB memory.*16\.0 GiB.*"
                        r"to 16\.0 or less"),
])
def test_a_trial_no_node_can_hold_is_refused_naming_the_field_and_the_fix(resources, message):
    with pytest.raises(SweepError, match="no trial was started") as e:
        check_capacity(_spec(**resources), CPU_ONLY)
    assert e.match(message)
    assert "simple_cnn" not in str(e.value)  # the entry that fits is not blamed


def test_resources_spread_over_two_nodes_do_not_make_one_bundle():
    nodes = [{"CPU": 8.0}, {"CPU": 1.0, "GPU": 1.0}]
    with pytest.raises(SweepError, match=r"models\.svm\.resources: no single node has 4 CPU, 1 GPU at once"):
        check_capacity(_spec(cpu=4, gpu=1), nodes)


def test_an_autoscaling_cluster_names_the_node_type_that_must_come_up():
    types = {"cpu_small": {"CPU": 2.0}, "gpu_worker": {"CPU": 8.0, "GPU": 1.0}}
    notes = check_capacity(_spec(cpu=4, gpu=1), CPU_ONLY, types)
    assert len(notes) == 1 and "models.svm" in notes[0] and "node of type gpu_worker" in notes[0]
    with pytest.raises(SweepError, match=r"gpu.*no node type of the autoscaler, cpu_small, gpu_worker, has it"):
        check_capacity(_spec(gpu=2), CPU_ONLY, types)


def test_memory_is_a_ray_resource_in_bytes():
    spec = _spec(cpu=1, memory_gb=1.5)
    assert spec.models["svm"].resources.as_ray() == {"CPU": 1.0, "memory": 1.5 * GIB}
    assert spec.models["simple_cnn"].resources.as_ray() == {"CPU": 1.0}
