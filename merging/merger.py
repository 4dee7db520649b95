"""The merge API: validate a config, check the checkpoints, stream the merge, optionally keep its state.

`merge` runs a batch merge of K experts; with `save_state` it also keeps the method's accumulators, so that
`add_experts` can later merge expert K+1 by reading only that expert (plus the base and the state).
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from merging.calibration import Coefficients, calibrate, calibrated_tensors, params_for
from merging.calibration.adapter_output import check_lora_experts, write_adapter
from merging.calibration.coefficients import write_calibration_artifacts
from merging.calibration.components import scaled_experts
from merging.config import ExpertRef, MergeConfig, describe_validation_error, load_config
from merging.errors import CheckpointError, ConfigError
from merging.experts import log_mixed_adapters, open_expert
from merging.io.checkpoint import CheckpointReader, CheckpointWriter, parse_size
from merging.methods import MergeMethod, method_class
from merging.methods.learned import LearnedCoefficients
from merging.methods.registry import is_calibrated, methods_of_kind
from merging.model_card import CARD_FILE, render_card
from merging.stacking import stack_layers
from merging.streaming import WeightedExpert, output_dtype, resolve_device, state_key, stream_merge
from merging.tensor_plan import AnyMethod, FixedMethod, TensorPlan

log = logging.getLogger("mergeplan")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STATE_FILE = "state.json"
STATE_PREFIX = "accumulators"
STATE_FORMAT = 1


@dataclass
class PreparedMerge:
    config: MergeConfig
    base: CheckpointReader
    tensors: TensorPlan | FixedMethod
    experts: list[WeightedExpert]
    merged_names: set[str]
    source: str

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES[self.config.dtype] if self.config.dtype else None

    @property
    def layout(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [(name, output_dtype(info.dtype, self.dtype), info.shape) for name, info in self.base.tensors.items()]

    @property
    def state_layout(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [(state_key(key, name), torch.float32, self.tensors[name].method.state_shape(key, info.shape))
                for name, info in self.base.tensors.items() if name in self.merged_names
                for key in self.tensors[name].method.state_names]

    def base_fingerprint(self) -> str:
        return hashlib.sha256(self.base.fingerprint().encode()).hexdigest()


def _check_experts(config: MergeConfig, method: type[AnyMethod], source: str) -> None:
    count = len(config.experts)
    if count < method.min_experts:
        raise ConfigError(f"{source}: experts: {method.name} needs at least {method.min_experts} experts, got {count}")
    if method.max_experts is not None and count > method.max_experts:
        raise ConfigError(f"{source}: experts: {method.name} takes at most {method.max_experts} expert(s), got "
                          f"{count}" + (" (it interpolates between the base and one expert: make one of the two "
                                        "models the base)" if method.max_experts == 1 else ""))


def _open_experts(config: MergeConfig, base: CheckpointReader, start_index: int,
                  seen: list[Path]) -> list[WeightedExpert]:
    experts = []
    for offset, ref in enumerate(config.experts[start_index:]):
        resolved = ref.path.resolve()
        if resolved in seen:
            log.warning("expert %s is listed more than once; it counts once per listing", ref.path)
        seen.append(resolved)
        expert = open_expert(ref.path, ref.lora)
        expert.check_compatible(base)
        experts.append(WeightedExpert(expert, ref.weight, start_index + offset))
    log_mixed_adapters([e.expert for e in experts])
    return experts


def prepare(config: MergeConfig, source: str = "config", first_new_expert: int = 0,
            method: MergeMethod | None = None) -> PreparedMerge:
    """Validate everything that can be checked before any tensor is merged (every tensor's parameters included);
    open the checkpoints. METHOD: one method for every tensor, with the experts' own weights."""
    _check_experts(config, type(method) if method is not None else method_class(config.method, source), source)
    try:
        parse_size(config.max_shard_size)
    except ValueError as exc:
        raise ConfigError(f"{source}: max_shard_size: {exc}") from exc
    base = CheckpointReader(config.base)
    seen = [ref.path.resolve() for ref in config.experts[:first_new_expert]]
    experts = _open_experts(config, base, first_new_expert, seen)
    # integer and boolean tensors (buffers, masks) are never averaged: they are copied from the base
    merged = {name for name, info in base.tensors.items() if info.dtype.is_floating_point
              and any(fnmatch.fnmatchcase(name, pattern) for pattern in config.include)}
    if not merged:
        raise ConfigError(f"{source}: include: patterns {config.include} match no tensor of {config.base}")
    names = [name for name in base.names() if name in merged]
    tensors = FixedMethod(method, [e.weight for e in config.experts]) if method is not None else \
        TensorPlan(config, names, base.names(), source)
    return PreparedMerge(config, base, tensors, experts, merged, source)


def _write_companions(plan: PreparedMerge, writer: CheckpointWriter) -> None:
    writer.copy_companions(plan.base.folder)
    model_config = dict(plan.base.config)
    if plan.config.dtype:
        model_config["dtype"] = plan.config.dtype
        if "torch_dtype" in model_config:
            model_config["torch_dtype"] = plan.config.dtype
    writer.write_json("config.json", model_config)
    write_recipe(plan.config, writer)


def write_recipe(config: MergeConfig, writer: CheckpointWriter) -> None:
    """merge_config.yaml (every path absolute) and the model card."""
    absolute = config.model_copy(update={
        "base": config.base.resolve(),
        "experts": [e.model_copy(update={"path": e.path.resolve(), "lora": e.lora.resolve() if e.lora else None})
                    for e in config.experts],
        "calibration": {name: path.resolve() for name, path in config.calibration.items()}})
    writer.write_text("merge_config.yaml",
                      yaml.safe_dump(absolute.model_dump(mode="json", by_alias=True), sort_keys=False))
    writer.write_text(CARD_FILE, render_card(config))


def refuse_output_over_inputs(config: MergeConfig, out: Path, source: str) -> None:
    """An output folder that is, holds or sits in an input folder would be written into it or, with --overwrite,
    replace it: refused before anything is read."""
    inputs = [config.base, *(ref.path for ref in config.experts), *config.calibration.values()]
    target = out.resolve()
    for folder in inputs:
        folder = folder.resolve()
        if target == folder or target.is_relative_to(folder) or folder.is_relative_to(target):
            where = "is" if target == folder else "is inside" if target.is_relative_to(folder) else "contains"
            raise ConfigError(f"{source}: output folder {out} {where} the input {folder}; write the merge to a "
                              "folder outside the base, expert and calibration folders")


def _run(plan: PreparedMerge, out: Path, overwrite: bool, state_in: CheckpointReader | None = None,
         state_dir: Path | None = None, artifacts: Callable[[CheckpointWriter], None] | None = None) -> Path:
    refuse_output_over_inputs(plan.config, out, plan.source)
    device = resolve_device(plan.config.device, plan.source)
    if state_dir is not None:
        refuse_output_over_inputs(plan.config, state_dir, plan.source)
    shard_size = parse_size(plan.config.max_shard_size)
    writer = CheckpointWriter(out, plan.layout, max_shard_size=shard_size, overwrite=overwrite)
    state_writer = None
    if state_dir is not None:
        state_writer = CheckpointWriter(state_dir, plan.state_layout, max_shard_size=shard_size,
                                        overwrite=state_in is not None or overwrite, prefix=STATE_PREFIX)
    # The state is entered first so that it is renamed into place last: only after the output exists.
    with ExitStack() as stack:
        if state_writer is not None:
            stack.enter_context(state_writer)
        stack.enter_context(writer)
        stream_merge(plan.base, plan.experts, plan.tensors, plan.merged_names, writer, plan.dtype, state_in,
                     state_writer, device)
        if state_writer is not None:
            state_writer.write_json(STATE_FILE, {
                "format": STATE_FORMAT,
                "config": plan.config.model_dump(mode="json", by_alias=True, exclude={"device"}),  # a run choice
                "base_fingerprint": plan.base_fingerprint(),
            })
        if artifacts is not None:
            artifacts(writer)
        _write_companions(plan, writer)
    log.info("merged %d experts with %s into %s", len(plan.config.experts), plan.tensors.method_class.name, out)
    return out


def merge(config: MergeConfig | str | Path, out: str | Path | None = None, *, overwrite: bool = False,
          save_state: str | Path | None = None, model_dir: Path | None = None, device: str | None = None) -> Path:
    """Merge a config's experts into the checkpoint folder `out` (default: the config's `out`); returns it.

    `config` is a MergeConfig or the path of a YAML file. With `save_state`, the method's accumulators
    are saved there for `add_experts`. MODEL_DIR: where a mergekit file's hub ids are looked up first. DEVICE
    (cpu, cuda, cuda:N) overrides the config's device: where the arithmetic runs.
    """
    source = str(config) if isinstance(config, str | Path) else "config"
    config = load_config(config, model_dir) if isinstance(config, str | Path) else config
    if device is not None:
        config = config.model_copy(update={"device": device})
    out = out if out is not None else config.out
    if out is None:
        raise ConfigError(f"{source}: out: no output folder; give one (mergeplan merge CONFIG OUT) or set out:")
    if config.method == "passthrough":
        if save_state:
            raise ConfigError(f"{source}: method: passthrough stacks layers and keeps no state to add experts to")
        return stack_layers(config, Path(out), overwrite, source)
    if is_calibrated(config.method):
        if save_state:
            raise ConfigError(f"{source}: method: {config.method} has no incremental state (its coefficients are "
                              "learned for the whole set of experts); merge again with the new expert")
        return _calibrated_merge(config, Path(out), overwrite, source)
    if config.calibration:
        log.warning("%s: calibration data is used only by %s; %s ignores it", source,
                    " and ".join(methods_of_kind("calibrated")), config.method)
    plan = prepare(config, source)
    if save_state and not issubclass(plan.tensors.method_class, MergeMethod):
        raise ConfigError(f"{source}: method: {config.method} reads every expert's tensor at once and keeps no "
                          "accumulators, so it has no incremental state; merge again with the new expert")
    return _run(plan, Path(out), overwrite, None, Path(save_state) if save_state else None)


def add_experts(state_dir: str | Path, experts: list[ExpertRef | str | Path], out: str | Path, *,
                overwrite: bool = False, state_out: str | Path | None = None) -> Path:
    """Merge saved accumulators with new experts into `out`, reading only the new experts. The updated state goes
    to `state_out`, or replaces the one in `state_dir` (only once the output exists). Equals a batch merge of all
    experts."""
    state_dir = Path(state_dir)
    state_in = CheckpointReader(state_dir, prefix=STATE_PREFIX, config_name=STATE_FILE)
    source = str(state_dir / STATE_FILE)
    if state_in.config.get("format") != STATE_FORMAT or "config" not in state_in.config:
        raise CheckpointError(f"{source}: not a mergeplan merge state (format {STATE_FORMAT})")
    previous = MergeConfig.model_validate(state_in.config["config"])
    if not experts:
        raise ConfigError("no new expert given; name at least one checkpoint folder to add")
    new_refs = [e if isinstance(e, ExpertRef) else ExpertRef(path=Path(e)) for e in experts]
    config = previous.model_copy(update={"experts": previous.experts + new_refs})
    plan = prepare(config, source, first_new_expert=len(previous.experts))
    if plan.base_fingerprint() != state_in.config.get("base_fingerprint"):
        raise CheckpointError(f"{source}: the base {config.base} changed shape or config since this state "
                              "was saved; run a full merge again")
    expected = {name for name, _, _ in plan.state_layout}
    if set(state_in.tensors) != expected:
        raise CheckpointError(f"{source}: accumulators do not match the base's tensors; run a full merge again")
    return _run(plan, Path(out), overwrite, state_in, Path(state_out) if state_out is not None else state_dir)


def _calibrated_merge(config: MergeConfig, out: Path, overwrite: bool, source: str) -> Path:
    try:
        params = params_for(config.method).model_validate(config.params)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source).replace(f"{source}: ", f"{source}: params.", 1)
                          ) from exc
    labels = [ref.label for ref in config.experts]
    if len(set(labels)) != len(labels):
        twice = next(label for label in labels if labels.count(label) > 1)
        raise ConfigError(f"{source}: experts: two experts are named {twice!r}; give each a distinct name: field")
    refuse_output_over_inputs(config, out, source)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: output folder exists; pass --overwrite or choose another")
    plan = prepare(config, source, method=LearnedCoefficients({}))
    names = calibrated_tensors(plan.base, plan.merged_names, params.exclude)
    if not names:
        raise ConfigError(f"{source}: params.exclude: every merged tensor is excluded; nothing to calibrate")
    experts = [e.expert for e in plan.experts]
    # lora_out: refuse what one adapter cannot hold before the minutes of calibration, not after them
    adapters = check_lora_experts(experts, names, plan.base, source) if params.lora_out else []
    result = calibrate(config, params, plan.base, experts, names, source)
    if params.lora_out:
        return write_adapter(result.coefficients, adapters, plan.base, out, overwrite=overwrite,
                             report=result.report, kept=result.kept)
    return apply_coefficients(result.coefficients, out, overwrite=overwrite, report=result.report,
                              kept=result.kept)


def apply_coefficients(coefficients: Coefficients | str | Path, out: str | Path, *, overwrite: bool = False,
                       report: dict | None = None, kept: dict[int, Coefficients] | None = None) -> Path:
    """Write base + Σ α·τ with learned coefficients (a Coefficients or a coefficients.json), no training.

    The folder gets coefficients.json and coefficients.png (and calibration.json when `report` is given, and
    epochs/coefficients-epoch-E.json for each of `kept`: the coefficients after epoch E, for `mergeplan apply`)."""
    source = str(coefficients) if isinstance(coefficients, str | Path) else "coefficients"
    if isinstance(coefficients, str | Path):
        coefficients = Coefficients.load(coefficients)
    # per-component tensors: each adapter's update arrives with its coefficients applied, weighed by 1 here
    alpha = {name: torch.ones(len(coefficients.expert_names), 1) if name in coefficients.ranks else a
             for name, a in coefficients.alpha.items()}
    plan = prepare(coefficients.config, source, method=LearnedCoefficients(alpha))
    unknown = [name for name in coefficients.alpha if name not in plan.base.tensors]
    if unknown:
        raise ConfigError(f"{source}: tensors.{unknown[0]}: the base {plan.config.base} has no such tensor")
    plan.merged_names = set(coefficients.alpha)
    if coefficients.ranks:
        plan.experts = scaled_experts(plan.experts, coefficients.expert_names, coefficients.alpha,
                                      coefficients.ranks, source)

    def artifacts(writer: CheckpointWriter) -> None:
        write_calibration_artifacts(writer, coefficients, report, kept)

    return _run(plan, Path(out), overwrite, artifacts=artifacts)
