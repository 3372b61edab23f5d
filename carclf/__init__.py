"""carclf: sweep, track, compare and promote car-model image classifiers.

The library, by stage (each imports only those below it; docs/architecture.md): `core` and `shipped` (what
every logged model carries), `data`, `models`, `config`, `training` and `tracking`, `experiment` (one tracked
run), `report`, `serving`, and the command line (`cli`). It never imports Ray or Optuna: `sweeps` does.
"""

__version__ = "0.1.0"
