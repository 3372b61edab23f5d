"""Hyperparameter sweeps: Ray Tune + Optuna over carclf runs (the only package that imports Ray and Optuna)."""
