"""A sweep's searched backbones ranked before its trials start: LogME of each, on the parent run; the best k kept.

    spec = rank_sweep_backbones(spec, overrides, client=client, parent=parent_run_id)

An SVM family whose space searches `backbone: {choices: [...]}` has each choice scored on the
train split its trials will read (carclf.training.rank: the same data, split, balancing and feature cache,
so the trials then read those train features back). The scores go to the parent run as
`backbone_scores.json` and as metrics `logme/<family>/<backbone>`; the report shows them beside each
backbone's best validation figure. With `rank_backbones: {keep: k}` in the sweep file, only the k
best choices of each family stay in its search. Ranking reads the train split only, so the choice is
made without validation or test images.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict
from typing import Any

from carclf.config import deep_merge, validate_run_config
from carclf.core.errors import CarclfError, SweepError
from carclf.report.backbones import BACKBONE_SCORES
from carclf.training.rank import Candidate, candidate_config, check_candidate, rank_backbones
from sweeps.search.params import Choice
from sweeps.search.spec import SweepSpec

log = logging.getLogger(__name__)


def searched_backbones(spec: SweepSpec) -> dict[str, list]:
    """Family -> its backbone choices, for every SVM family that searches two or more."""
    out = {}
    for key in spec.models:
        if spec.is_network(key):
            continue
        choice = spec.model_space(key).backbone
        if isinstance(choice, Choice) and len(choice.choices) > 1:
            out[key] = list(choice.choices)
    return out


def check_searched_backbones(spec: SweepSpec) -> None:
    """Every searched backbone's weights are there and fit the family's image size: checked before Ray starts."""

    for key, choices in searched_backbones(spec).items():
        base = validate_run_config(spec.base_config(key), f"models.{key}")
        for choice in choices:
            try:
                check_candidate(candidate_config(base, Candidate(choice)))
            except CarclfError as e:
                raise SweepError(f"models.{key}.space.backbone: {choice!r} cannot be used, so every {key} trial "
                                 f"drawing it would fail: {e}") from None


def rank_sweep_backbones(spec: SweepSpec, overrides: dict, *, client, parent: str) -> SweepSpec:
    """Score every searched backbone, log the scores on `parent`, and return the spec with the kept choices.

    The spec comes back unchanged without searched backbones or with `rank_backbones: {score: false}`.
    """
    families = searched_backbones(spec)
    if not families or not spec.rank_backbones.score:
        return spec
    keep = spec.rank_backbones.keep
    try:
        records = [_rank_family(spec, key, choices, overrides, keep) for key, choices in families.items()]
    except BaseException as e:  # no trial has started: the parent run ends here rather than stay RUNNING
        client.set_terminated(parent, status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    client.log_dict(parent, {"keep": keep, "families": records}, BACKBONE_SCORES)
    for record in records:
        for score in record["scores"]:
            client.log_metric(parent, metric_name(record["family"], score["backbone"]), score["logme"])
    return _keep(spec, {r["family"]: r["kept"] for r in records})


def _rank_family(spec: SweepSpec, key: str, choices: list, overrides: dict, keep: int | None) -> dict[str, Any]:
    cfg = validate_run_config(deep_merge(spec.base_config(key), {"data": overrides["data"]}),
                              f"models.{key} (ranking its backbones)")
    print(f"ranking {len(choices)} backbones of {key} by LogME on its train features", flush=True)
    scores = rank_backbones(cfg, [Candidate(c) for c in choices], progress=True)
    by_label = {Candidate(c).label: c for c in choices}
    kept = [by_label[s.backbone] for s in scores][:keep] if keep else list(choices)
    for rank, s in enumerate(scores, 1):
        mark = "kept" if by_label[s.backbone] in kept else "left out"
        print(f"  {rank}. {s.backbone}: LogME {s.logme:.4f} ({mark})", flush=True)
    return {"family": key, "scores": [asdict(s) for s in scores], "kept": kept}


def _keep(spec: SweepSpec, kept: dict[str, list]) -> SweepSpec:
    """The spec with each ranked family's backbone choices cut to the kept ones (a constant when one is left)."""
    models = {}
    for key, entry in spec.models.items():
        if key in kept:
            backbone = {"choices": kept[key]} if len(kept[key]) > 1 else kept[key][0]
            entry = entry.model_copy(update={"space": {**entry.space, "backbone": backbone}})
        models[key] = entry
    return spec.model_copy(update={"models": models})


def metric_name(family: str, backbone: str) -> str:
    """`logme/<family>/<backbone>`, with what MLflow refuses in a metric name (e.g. a stack's '+') as '_'."""
    return re.sub(r"[^\w\-. /:]", "_", f"logme/{family}/{backbone}")
