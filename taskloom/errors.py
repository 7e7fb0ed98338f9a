"""User-facing errors.

Anything a user can cause (a bad config, a missing file, a corrupt checkpoint) raises a
:class:`TaskloomError`. The CLI prints its message and exits non-zero, without a traceback:
the message itself must say what was wrong, where, and how to fix it.
"""


class TaskloomError(Exception):
    """Base class of errors caused by user input."""


class ConfigError(TaskloomError):
    """A configuration file, key or value is invalid."""


class DataError(TaskloomError):
    """A dataset, its files or its annotations are missing or invalid."""


class CheckpointError(TaskloomError):
    """A checkpoint cannot be read, or does not match the model it is loaded into."""
