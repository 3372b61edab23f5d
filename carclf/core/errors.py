"""Errors that carry a message for the user: bad input, missing files, unreachable services.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class CarclfError(Exception):
    """Base of every user-facing carclf error; the message names the offending input."""


class ConfigError(CarclfError, ValueError):
    """A configuration value (file, field or override) is invalid; the message names it."""


class DataError(CarclfError):
    """An image folder, manifest or cache entry is missing, empty or unreadable."""


class WeightsError(CarclfError):
    """Pretrained weights cannot be found or loaded; the message names the file and the folder."""


class TrackingError(CarclfError):
    """MLflow (database, server, run, registered model) is unreachable or missing something."""


class SweepError(CarclfError):
    """A sweep definition, its results folder or its cluster settings are unusable."""
