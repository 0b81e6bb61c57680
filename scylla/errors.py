"""Errors users see. Each message names the bad field, file or value and says how to fix it.

The CLI prints any ``ScyllaError`` as one line and exits with status 2.
"""


class ScyllaError(Exception):
    """Base of every error caused by bad input rather than a bug."""


class ConfigError(ScyllaError, ValueError):
    """A configuration value is invalid; the message names the field."""


class TargetError(ScyllaError):
    """A target cannot be found or loaded."""


class DataError(ScyllaError):
    """A data file, prompt or shard is missing, malformed or corrupt; names the file."""


class DraftMismatchError(ScyllaError):
    """A draft was loaded against a target it was not built for."""
