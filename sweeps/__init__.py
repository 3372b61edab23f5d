"""Hyperparameter sweeps: Ray Tune + Optuna over carclf runs (the only package that imports Ray and Optuna).

By stage: `search` (the sweep file, its spaces, defaults, each family's Optuna search, the plan), `analysis`
(why a sweep found what it found) and `run` (the runner, the driver, the Tuner, one trial). The sweep files
(`*.yaml`) sit beside them.
"""
