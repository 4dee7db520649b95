"""The library's errors: one exception type per family of failure, each carrying a one-line message for the user.

The CLI prints the message and exits with status 2; no traceback is shown for these. The pipeline's own errors
(store, registry, stack) subclass MergeplanError in infra/errors.py.
"""


class MergeplanError(Exception):
    """Base of every error mergeplan reports to a user as one line."""


class ConfigError(MergeplanError):
    """A configuration file or parameter is invalid."""


class CheckpointError(MergeplanError):
    """A checkpoint folder or safetensors file is missing, unsafe, corrupt or incompatible."""


class TrainingError(MergeplanError):
    """Training or calibration diverged (a non-finite loss)."""
