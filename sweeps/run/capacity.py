"""Can every model entry's trial run on this Ray cluster? Checked once on the driver, after ray.init, before any trial.

    notes = check_capacity(spec, cluster_nodes(), node_types())   # SweepError for a trial no node can hold

A trial is one bundle ({"CPU": 2, "GPU": 1, "memory": ...}) placed on a single node, so it fits if
some alive node has all of it at once. Otherwise Ray would keep the trial PENDING until the time
budget ends. On a fixed cluster that is refused with the model entry, the field and the fix; on an
autoscaling cluster it is fine if one of its node types can hold the trial (the note says which
type must come up), and refused if none can.
"""

from __future__ import annotations

import logging

import ray
from ray._private.state import state

from carclf.core.errors import SweepError
from sweeps.run.cluster import _autoscaler_may_grow
from sweeps.search.spec import SweepSpec

log = logging.getLogger(__name__)

GIB = 1024 ** 3
_FIELDS = {"CPU": "cpu", "GPU": "gpu", "memory": "memory_gb"}


def cluster_nodes() -> list[dict[str, float]]:
    """The total resources of each alive node of the connected cluster (call after ray.init)."""

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def node_types(n_alive: int) -> dict[str, dict[str, float]] | None:
    """The autoscaler's node types that can still be added ({name: resources}); None for a fixed cluster."""

    if not _autoscaler_may_grow(n_alive):
        return None

    groups = state.get_cluster_config().node_group_configs
    return {g.name or f"group {i}": dict(g.resources) for i, g in enumerate(groups) if g.max_count != 0}


def _fits(bundle: dict[str, float], resources: dict[str, float]) -> bool:
    return all(resources.get(k, 0.0) >= v for k, v in bundle.items())


def _show(resource: str, value: float) -> str:
    return f"{value / GIB:.1f} GiB memory" if resource == "memory" else f"{value:g} {resource}"


def _why_not(key: str, bundle: dict[str, float], nodes: list[dict[str, float]]) -> str:
    """The first resource no node has enough of, with the field to change and how."""
    for resource, need in bundle.items():
        largest = max((n.get(resource, 0.0) for n in nodes), default=0.0)
        if largest >= need:
            continue
        field = f"models.{key}.resources.{_FIELDS.get(resource, resource)}"
        if resource == "GPU" and largest == 0:
            fix = (f"set {field}: 0 to train on CPU, or run the sweep where a node has a GPU "
                   "(--address of a cluster with GPU nodes)")
        elif resource == "memory":
            fix = f"lower {field} to {largest / GIB:.1f} or less"
        else:
            fix = f"lower {field} to {largest:g} or less"
        return (f"{field}: each trial asks for {_show(resource, need)}, but the largest node has "
                f"{_show(resource, largest)} ({len(nodes)} node(s)); {fix}")
    asked = ", ".join(_show(k, v) for k, v in bundle.items())
    return (f"models.{key}.resources: no single node has {asked} at once; lower the entry's resources so that "
            "one node holds them all")


def check_capacity(spec: SweepSpec, nodes: list[dict[str, float]],
                   types: dict[str, dict[str, float]] | None = None) -> list[str]:
    """Refuse (SweepError) a model entry whose trial no node can hold; returns notes for an autoscaling cluster."""
    problems, notes = [], []
    for key, entry in spec.models.items():
        bundle = entry.resources.as_ray()
        if any(_fits(bundle, n) for n in nodes):
            continue
        fitting = sorted(name for name, res in (types or {}).items() if _fits(bundle, res))
        if fitting:
            notes.append(f"models.{key}: no node up now can hold a trial ({entry.resources.as_ray()}); its trials "
                         f"wait until the autoscaler starts a node of type {' or '.join(fitting)}")
            continue
        problem = _why_not(key, bundle, nodes)
        if types is not None:
            problem += f" (and no node type of the autoscaler, {', '.join(sorted(types)) or 'none'}, has it either)"
        problems.append(problem)
    if problems:
        raise SweepError("this sweep cannot run on this Ray cluster, so no trial was started:\n  "
                         + "\n  ".join(problems))
    return notes


def check_cluster_capacity(spec: SweepSpec) -> None:
    """check_capacity against the connected cluster; notes are printed."""
    nodes = cluster_nodes()
    for note in check_capacity(spec, nodes, node_types(len(nodes))):
        print(note, flush=True)
