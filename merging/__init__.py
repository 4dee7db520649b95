"""mergeplan's pure library (no prefect, mlflow or boto3): the merge core at this level (config, merger, streaming,
experts, evaluate) and one package per job: io, methods, calibration, data, zoo, sweep, scaling_law. This face
is the merge itself: merge, add_experts, load_config and the library's errors."""

from merging.config import ExpertRef, MergeConfig, load_config
from merging.errors import CheckpointError, ConfigError, MergeplanError
from merging.merger import add_experts, merge

__all__ = ["CheckpointError", "ConfigError", "ExpertRef", "MergeConfig", "MergeplanError", "add_experts",
           "load_config", "merge"]
