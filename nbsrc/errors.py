"""Errors a user can act on.

Every error raised for bad input derives from :class:`NbsrcError`; its message is one line that says
what was wrong and how to fix it. The CLI prints that line (``error: ...``) instead of a traceback.
"""


class NbsrcError(Exception):
    """Base class: a problem with the user's input, data or environment, not a bug."""


class ConfigError(NbsrcError, ValueError):
    """A parameter has a value that cannot work (unknown name, out of range, inconsistent)."""


class DatasetError(NbsrcError):
    """A dataset is missing, truncated, corrupt or laid out differently from what is expected."""


class WeightsError(NbsrcError):
    """Pretrained weights were asked for but cannot be loaded."""


class RunDirError(NbsrcError):
    """A run directory is missing, incomplete, or would be overwritten."""


class NonFiniteLossError(NbsrcError, FloatingPointError):
    """The training loss became NaN or inf."""
