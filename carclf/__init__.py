"""carclf: sweep, track, compare and promote car-model image classifiers."""

__version__ = "0.1.0"
