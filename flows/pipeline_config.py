"""The pipeline YAML as data: what to merge, how, where the evaluation data is, how to decide, where to run.

    base: {name: tiny-base}                  # uri: s3://BUCKET/bases/BASE by default, or path: a local folder
    experts: all                             # every expert registered for the base in MLflow, or a list of S3 URIs
    method: ties
    params: {density: 0.3, lambda: 0.5}
    calibration: {algebra: data/algebra/calib.jsonl}   # expert_merging(_pp); default: DOMAIN/calib.jsonl of data
    data: path/to/data                       # DOMAIN/{eval,calib}.jsonl; or s3://BUCKET/data (mergeplan data upload)
    eval: {split: eval, max_examples: 64, batch_size: 32}
    law: {target_loss: 1.9, min_gain: 0.002, epsilon: 0.01, prefix_points: [1, 2, 4], min_r_squared: 0.9}
    champion: {margin: 0.0, domains: null}   # crowned only below the champion's and the base's CE by more than margin
    runner: {kind: threads}                  # or {kind: dask, n_workers: 2} or {kind: dask, address: tcp://...}
    sweep: {methods: [average, ties], design: balanced, eval_examples: 16}   # the scaling-sweep flow (SweepSettings)
    warm_start: {enabled: true, epochs: 2}   # a new expert joins a calibrated head from its coefficients; or false
    experiment: mergeplan/tiny-base          # default
    seed: 0

Relative paths are taken from the YAML file's folder. Errors are one line naming the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from merging.config import read_yaml, validated
from merging.scaling_law.decision import DecisionRule
from merging.sweep.run import SweepSettings

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"  # dots separate the parts of registry names and event resources
ALL_REGISTERED = "all"


class BaseRef(BaseModel):
    """The base checkpoint: its name in the registry and the store, and where to read it from."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=_NAME_PATTERN)
    uri: str | None = None  # s3://...; default: s3://BUCKET/bases/NAME
    path: Path | None = None  # a local folder instead of the store

    @model_validator(mode="after")
    def _one_source(self) -> BaseRef:
        if self.uri is not None and self.path is not None:
            raise ValueError("give uri or path, not both")
        if self.uri is not None and not self.uri.startswith("s3://"):
            raise ValueError(f"uri {self.uri!r} is not an S3 URI; use path: for a local folder")
        return self


class EvalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    split: str = "eval"
    domains: list[str] | None = None  # default: every domain folder of the data
    max_examples: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    accuracy_samples: int = Field(0, ge=0)


class LawSettings(DecisionRule):
    """When to stop adding experts (merging.scaling_law.decision's rule: the band of the next expert's predicted
    gain below min_gain, or the target loss met; `uncertain` and `law_fails` keep going), plus what the plan reports."""

    epsilon: float | None = Field(None, gt=0)
    # A full run also merges the first k experts for each k here (nested runs), so the law has points to fit.
    prefix_points: list[int] = Field(default_factory=list)

    @field_validator("prefix_points")
    @classmethod
    def _positive(cls, points: list[int]) -> list[int]:
        if any(k < 1 for k in points):
            raise ValueError("every k must be >= 1")
        return sorted(set(points))


class ChampionRule(BaseModel):
    """When a merge is crowned (alias `champion`): its CE, the mean over DOMAINS (default: every evaluated domain),
    is below the current champion's and the base's by more than MARGIN. The base is the zeroth champion: a merge
    worse than not merging is never crowned."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    margin: float = Field(0.0, ge=0)
    domains: list[str] | None = Field(None, min_length=1)


class RunnerSettings(BaseModel):
    """Where tasks run: threads in the flow's process, or a Dask cluster (a new LocalCluster or a scheduler, which
    deals the tasks to whichever of its workers is free)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["threads", "dask"] = "threads"
    max_workers: int | None = Field(None, ge=1)  # threads
    address: str | None = None  # dask: tcp://HOST:PORT of a running scheduler
    n_workers: int = Field(2, ge=1)  # dask: workers of a new LocalCluster (a scheduler has the workers it has)
    threads_per_worker: int = Field(1, ge=1)  # dask: of a new LocalCluster
    # dask with address: how often a run whose tasks wait for a resource no worker declares (GPU) says so
    report_waits_s: float = Field(60.0, gt=0)

    @field_validator("address")
    @classmethod
    def _scheduler_address(cls, address: str | None) -> str | None:
        if address is not None and not re.fullmatch(r"tcp://[^\s/]+:\d+", address):
            raise ValueError(f"{address!r} is not a Dask scheduler address; write tcp://HOST:PORT (`dask scheduler` "
                             "prints it)")
        return address

    @model_validator(mode="after")
    def _dask_only(self) -> RunnerSettings:
        if self.kind == "threads" and self.address is not None:
            raise ValueError("address is for kind: dask")
        return self


class WarmStartSettings(BaseModel):
    """How on-new-expert calibrates when a new expert joins a head calibrated with the same method and params
    (expert_merging(_pp), adamerging): from the head's coefficients, the new expert at params.init. `false` is
    short for `{enabled: false}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = Field(True, description="false: every new expert calibrates all the experts from scratch")
    epochs: int = Field(2, gt=0, description="the warm start's training budget: its params.epochs (params.epochs "
                        "stays the budget of a cold calibration); EM++ then trains stage 2 only, on the head's chunks")

    @model_validator(mode="before")
    @classmethod
    def _switch(cls, data: Any) -> Any:
        return {"enabled": data} if isinstance(data, bool) else data


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    base: BaseRef
    experts: Literal["all"] | list[str] = ALL_REGISTERED
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    calibration: dict[str, Path] = Field(default_factory=dict)
    data: Path | str  # a local folder, or a folder in the store (s3://...)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    law: LawSettings = Field(default_factory=LawSettings)
    champion: ChampionRule = Field(default_factory=ChampionRule)
    runner: RunnerSettings = Field(default_factory=RunnerSettings)
    sweep: SweepSettings = Field(default_factory=SweepSettings)
    warm_start: WarmStartSettings = Field(default_factory=WarmStartSettings)
    experiment: str | None = None
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _no_log_model(cls, data: Any) -> Any:
        """`log_model` copied the merged checkpoint into the run; the registered version is now itself an MLflow
        model, so `false` (in YAML files written before) is dropped and `true` refused."""
        if isinstance(data, dict) and "log_model" in data:
            if data["log_model"]:
                raise ValueError("log_model: true was removed: the registered version is itself an MLflow model "
                                 "(models:/merged.BASE@champion loads it) and is not copied into the run; delete the "
                                 "line")
            data = {key: value for key, value in data.items() if key != "log_model"}
        return data

    @field_validator("experts")
    @classmethod
    def _s3_uris(cls, experts: Any) -> Any:
        if isinstance(experts, list):
            if not experts:
                raise ValueError("is empty; list S3 URIs or write `all`")
            bad = [uri for uri in experts if not uri.startswith("s3://")]
            if bad:
                raise ValueError(f"{bad[0]!r} is not an S3 URI (s3://BUCKET/experts/BASE/NAME)")
        return experts

    @field_validator("data")
    @classmethod
    def _local_or_s3(cls, data: Path | str) -> Path | str:
        return data if str(data).startswith("s3://") else Path(data)

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"mergeplan/{self.base.name}"

    def resolved_against(self, folder: Path) -> PipelineConfig:
        base = self.base if self.base.path is None else self.base.model_copy(update={"path": folder / self.base.path})
        return self.model_copy(update={
            "base": base, "data": self.data if isinstance(self.data, str) else folder / self.data,
            "calibration": {name: folder / path for name, path in self.calibration.items()}})

    def method_identity(self) -> dict[str, Any]:
        """What besides the experts decides the merged weights: part of every merge's cache key."""
        return {"method": self.method, "params": self.params, "seed": self.seed}

    def as_parameters(self) -> dict[str, Any]:
        """JSON-ready, for deployment parameters."""
        return json.loads(self.model_dump_json())


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    """Read a pipeline YAML file; relative paths in it are relative to the file's folder."""
    path = Path(path)
    config = validated(PipelineConfig, read_yaml(path, "pipeline config"), str(path), "base, method, data")
    return config.resolved_against(path.parent.resolve())
