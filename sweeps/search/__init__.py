"""What a sweep searches and in what order: the sweep file's parameters and their spaces (params, spec),
each family's default configuration, its Optuna search (family), warm starts, the Optuna view of
finished trials (studies), and the plan printed before the first trial.

Each name below loads its module on first use, so importing this package stays cheap.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "params": ['Choice', 'FloatRange', 'IntRange', 'GammaRange'],
        "spec": ['SweepSpec', 'NetworkSpace', 'SVMSpace', 'load_sweep_spec', 'validate_sweep_spec'],
        "defaults": ['default_trial'],
        "family": ['family_searcher', 'cover_size'],
        "warmstart": ['warm_start_points'],
        "studies": ['SweepTrial', 'sweep_spec', 'sweep_trials', 'family_study'],
        "plan": ['show_plan'],
    },
)
