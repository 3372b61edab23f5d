"""Running a sweep on Ray Tune: the runner and what the driver settles first (driver, preflight, capacity,
cluster, session, prefetch, ranking), the Tuner and the budget across families (tuner, budget), one trial
(trial, equivalence, records), and what the driver watches and collects (progress, watchdog, results, stored).

Each name below loads its module on first use, so importing this package stays cheap.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "runner": ['run_sweep'],
        "driver": ['plan_sweep'],
        "trial": ['run_trial', 'TrialContext'],
        "budget": ['budget_search'],
    },
)
