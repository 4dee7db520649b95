"""Merge configuration as data: pydantic models loaded from YAML, every error naming its field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from merging.errors import ConfigError
from merging.mergekit_config import from_mergekit, is_mergekit
from merging.parameters import LayerSlice, StackedRange

Model = TypeVar("Model", bound=BaseModel)

OutputDtype = Literal["float32", "float16", "bfloat16"]


class ExpertRef(BaseModel):
    """One expert checkpoint and its weight in the merge (for calibrated methods: its task weight β)."""

    model_config = ConfigDict(extra="forbid")
    path: Path
    lora: Path | None = None  # a PEFT adapter applied to PATH (mergekit's MODEL+LORA), streamed per tensor
    weight: float = 1.0
    name: str | None = None  # default: the folder's name; keys its calibration data
    # per-expert settings that vary by tensor or override params: (weight, density, gamma, epsilon), see parameters
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or self.path.name

    @field_validator("weight")
    @classmethod
    def _finite(cls, weight: float) -> float:
        if weight != weight or weight in (float("inf"), float("-inf")):
            raise ValueError("must be a finite number")
        return weight


class MergeConfig(BaseModel):
    """What to merge and how; `params` are validated by the chosen method."""

    model_config = ConfigDict(extra="forbid")
    base: Path
    experts: list[ExpertRef] = Field(min_length=1)
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    dtype: OutputDtype | None = None
    seed: int = 0
    include: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    max_shard_size: int | str = "5GB"
    out: Path | None = None  # output folder, when not given on the command line or to merge()
    calibration: dict[str, Path] = Field(default_factory=dict)  # expert name -> unlabeled data file or folder
    slices: list[LayerSlice] = Field(default_factory=list)  # settings by layer range (mergekit's slices:)
    stack: list[StackedRange] = Field(default_factory=list)  # method passthrough: layer ranges of experts, stacked
    device: str | None = None  # where the arithmetic runs: cpu (default) or cuda[:N], as mergekit's --cuda

    @field_validator("experts", mode="before")
    @classmethod
    def _expert_paths(cls, experts: Any) -> Any:
        if isinstance(experts, list):
            return [{"path": e} if isinstance(e, str | Path) else e for e in experts]
        return experts

    def resolved_against(self, folder: Path) -> MergeConfig:
        """The same config with relative paths taken from `folder` (the YAML file's folder)."""
        return self.model_copy(update={
            "base": folder / self.base,
            "experts": [e.model_copy(update={"path": folder / e.path,
                                             "lora": folder / e.lora if e.lora is not None else None})
                        for e in self.experts],
            "out": folder / self.out if self.out is not None else None,
            "calibration": {name: folder / path for name, path in self.calibration.items()},
        })


def describe_validation_error(error: ValidationError, source: str) -> str:
    """One line naming the first offending field, e.g. 'merge.yaml: params.density: ...'."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "(top level)"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        message = "is required"
    elif first["type"] == "extra_forbidden":
        message = "is not a known field"
    elif first["type"] == "too_short" and field == "experts":
        message = "is empty; list at least one expert checkpoint folder"
    return f"{source}: {field}: {message}{more}"


def validated(model: type[Model], data: Any, source: str, fields: str) -> Model:
    """DATA as MODEL; anything else is one ConfigError line naming SOURCE and the first bad field (FIELDS: the
    main ones, for the message when DATA is not a mapping at all)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with {fields}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from exc


def parse_config(data: Any, source: str = "config") -> MergeConfig:
    return validated(MergeConfig, data, source, "base, experts, method")


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's data; an unreadable or malformed file is one ConfigError line naming it."""
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc


def load_config(path: str | Path, model_dir: Path | None = None) -> MergeConfig:
    """Read a merge YAML file, ours or mergekit's (it has merge_method:); relative paths in it are relative to the
    file's folder. A mergekit file's hub ids are looked up in MODEL_DIR, then in the local Hugging Face cache."""
    path = Path(path)
    data = read_yaml(path, "config")
    if is_mergekit(data):
        data = from_mergekit(data, str(path), model_dir)
    return parse_config(data, str(path)).resolved_against(path.parent)
