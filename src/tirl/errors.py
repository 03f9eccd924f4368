"""tirl's exceptions. The CLI prints a `TirlError` as one line and exits 2, without a traceback."""


class TirlError(Exception):
    """An error whose message alone tells the user what was wrong and how to fix it."""


class ConfigError(TirlError):
    """A recipe or command-line value is invalid (the message names the key)."""


class ModelNotFoundError(TirlError):
    """A model name or path cannot be resolved to weights."""


class DataError(TirlError):
    """A dataset file or row is malformed (the message names the file and row)."""


class ResumeError(TirlError):
    """A run directory cannot be resumed as asked."""


class StalledError(TirlError):
    """Something made no progress for longer than its watchdog allows."""


class InvariantError(TirlError):
    """A DESIGN.md invariant was violated at runtime (a bug in tirl or in a user extension)."""


class RolloutError(TirlError):
    """Too many trajectories of a step failed (the message lists the errors)."""
