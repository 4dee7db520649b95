"""The pipeline's errors: the object store, the MLflow registry, a refused expert and the local stack, each a
MergeplanError carrying a one-line message for the user."""

from merging.errors import MergeplanError


class StorageError(MergeplanError):
    """An object store (S3, MinIO) is unreachable, lacks an object, or returned bytes that fail verification."""


class RegistryError(MergeplanError):
    """The MLflow tracking server is unreachable or refuses a registration."""


class ExpertRefused(RegistryError):
    """A registered expert cannot join the pipeline's merges (another base); unlike an outage, retrying is futile."""


class StackError(MergeplanError):
    """A service of the local stack cannot start, is unhealthy, or its port is taken."""
