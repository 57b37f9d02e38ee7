"""Exceptions with one-line messages that name the file, key or argument at fault.

Every error caused by a user's input (a file, a config key, an API argument)
is raised as a subclass of :class:`GmanError`.  The console script prints
``gman: error: <message>`` for these and exits with status 2; anything else is
a bug and keeps its traceback.
"""


class GmanError(ValueError):
    """Base class of all user-facing input errors (a ``ValueError``)."""


class DataError(GmanError):
    """A data, graph or embedding file (or DataFrame) is missing, malformed or inconsistent."""


class ConfigError(GmanError):
    """A configuration key or value is unknown or invalid."""


class ForecastInputError(GmanError):
    """A history passed to a forecaster cannot be used (sensors, interval, length, values)."""


class UnknownDatasetError(DataError):
    """No dataset card has that name."""
