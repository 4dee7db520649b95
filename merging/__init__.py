"""mergeplan's pure library: checkpoints, task vectors, merge methods (no prefect, mlflow or boto3)."""

from merging.config import ExpertRef, MergeConfig, load_config
from merging.errors import CheckpointError, ConfigError, MergeplanError
from merging.merger import add_experts, merge

__all__ = ["CheckpointError", "ConfigError", "ExpertRef", "MergeConfig", "MergeplanError", "add_experts",
           "load_config", "merge"]
