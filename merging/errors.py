"""One exception type per family of failure, each carrying a one-line message for the user.

The CLI prints the message and exits with status 2; no traceback is shown for these.
"""


class MergeplanError(Exception):
    """Base of every error mergeplan reports to a user as one line."""


class ConfigError(MergeplanError):
    """A configuration file or parameter is invalid."""


class CheckpointError(MergeplanError):
    """A checkpoint folder or safetensors file is missing, unsafe, corrupt or incompatible."""


class TrainingError(MergeplanError):
    """Training or calibration diverged (a non-finite loss)."""


class StorageError(MergeplanError):
    """An object store (S3, MinIO) is unreachable, lacks an object, or returned bytes that fail verification."""


class RegistryError(MergeplanError):
    """The MLflow tracking server is unreachable or refuses a registration."""


class ExpertRefused(RegistryError):
    """A registered expert cannot join the pipeline's merges (another base); unlike an outage, retrying is futile."""


class StackError(MergeplanError):
    """A service of the local stack cannot start, is unhealthy, or its port is taken."""
