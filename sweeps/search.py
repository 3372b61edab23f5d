"""The searcher's parts beyond Ray Tune's OptunaSearch: several objectives, and the points it starts from.

    searcher = ParetoSearch(space=spec.space_fn(), metric=["val_f1_macro", "infer_ms_per_img"], mode=["max", "min"],
                            sampler=optuna.samplers.TPESampler(seed=0), points_to_evaluate=points)

Points to evaluate are enqueued in Optuna's study in the order given (`Study.enqueue_trial`): the
first trials of the sweep are exactly those configurations, the sampler takes over after them.
"""

from __future__ import annotations

import math

from ray.tune.search.optuna import OptunaSearch


class ParetoSearch(OptunaSearch):
    """OptunaSearch over several objectives that tells Optuna a trial without a finite value for every
    objective as PRUNED: a network stopped by ASHA ends on an epoch's result, which has no model size.

    (OptunaSearch would tell it COMPLETE with a NaN, which Optuna records as a failed trial.)
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if result and not error and isinstance(self.metric, list):
            values = [result.get(m) for m in self.metric]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                result = None  # OptunaSearch tells a trial that ended without a result as PRUNED
        super().on_trial_complete(trial_id, result, error)
