"""Experts as sources of task vectors: full checkpoint folders, or PEFT LoRA adapter folders.

Every merge reads an expert one base tensor at a time: `load` does the I/O (it runs on the read-ahead
thread), `task_vector` turns what was loaded into the float32 task vector τ = expert − base of that tensor,
or None where the expert leaves the tensor as the base has it. A LoRA adapter's τ is computed per tensor
from its factors, (alpha/r)·B@A (alpha/sqrt(r) with rsLoRA), so the dense task vector of a whole adapter
never exists at once.
"""

from __future__ import annotations

import json
import logging
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from merging.errors import CheckpointError
from merging.io.checkpoint import STRUCTURAL_FIELDS, CheckpointReader, check_compatible, refuse_pickles
from merging.io.safetensors_file import TensorInfo, read_header, read_tensor

log = logging.getLogger("mergeplan")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# adapter_config.json fields that make the adapted weight something other than W + scale·B@A
UNSUPPORTED_LORA_FEATURES = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets",
    "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
}
# dtypes whose every value float32 holds exactly: widening them first changes no task vector
EXACT_IN_FLOAT32 = (torch.float32, torch.bfloat16, torch.float16)
_FACTOR_KEY = re.compile(r"(?P<module>.+)\.(?P<factor>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                         r"(?P<suffix>\.weight|\.bias)?$")


def require_finite(tensor: torch.Tensor, folder: Path, name: str) -> None:
    # one cheap reduction first; the exact test only when the sum is not finite
    if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
        raise CheckpointError(f"{folder}: tensor {name} contains NaN or Inf; fix or re-export that checkpoint")


class Expert(ABC):
    """One fine-tune of the base, read tensor by tensor as task vectors."""

    folder: Path
    kind: str

    @abstractmethod
    def check_compatible(self, base: CheckpointReader) -> None:
        """Refuse an expert that is not a fine-tune of `base`, naming the field or tensor."""

    @abstractmethod
    def load(self, name: str) -> object:
        """Read what the task vector of base tensor `name` needs (I/O only: it may run on another thread)."""

    @abstractmethod
    def task_vector(self, name: str, loaded: object, base_tensor: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor | None:
        """τ of tensor `name` in float32, written into `out` (base_tensor's shape); None where τ is zero."""

    def read_task_vector(self, name: str, base_tensor: torch.Tensor) -> torch.Tensor | None:
        return self.task_vector(name, self.load(name), base_tensor, torch.empty_like(base_tensor,
                                                                                     dtype=torch.float32))

    def weights(self, name: str, base: CheckpointReader) -> torch.Tensor:
        """The expert's own value of tensor `name`, in the base's dtype."""
        stored = base.read(name)
        vector = self.read_task_vector(name, stored.float())
        return stored if vector is None else vector.add_(stored.float()).to(stored.dtype)

    def describe(self) -> str:
        return self.kind


class FullCheckpoint(Expert):
    """A Hugging Face model folder with every tensor of the base."""

    kind = "full checkpoint"

    def __init__(self, folder: Path):
        self.reader = CheckpointReader(folder)
        self.folder = self.reader.folder

    def check_compatible(self, base: CheckpointReader) -> None:
        check_compatible(base, self.reader)

    def load(self, name: str) -> torch.Tensor:
        return self.reader.read(name)

    def task_vector(self, name: str, loaded: torch.Tensor, base_tensor: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
        if loaded.dtype in EXACT_IN_FLOAT32:  # widen, then subtract in float32: the mixed-dtype sub is 5x slower
            out.copy_(loaded).sub_(base_tensor)
        else:
            torch.sub(loaded, base_tensor, out=out)
        require_finite(out, self.folder, name)
        return out

    def weights(self, name: str, base: CheckpointReader) -> torch.Tensor:
        return self.reader.read(name)


@dataclass(frozen=True)
class LoraFactors:
    """τ = scale · B @ A for one base tensor (transposed for embeddings and fan_in_fan_out layers)."""

    a: TensorInfo  # (r, in)
    b: TensorInfo  # (out, r)
    scale: float
    transposed: bool
    bias: TensorInfo | None = None  # lora_B's bias, when lora_bias: its τ on the module's bias is scale · bias

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        rows, columns = self.b.shape[0], self.a.shape[1]
        return (columns, rows) if self.transposed else (rows, columns)


@dataclass
class TensorChange:
    """What an adapter does to one base tensor: a full replacement (modules_to_save, a trained bias), low-rank
    factors, or both (an embedding saved with its base layer)."""

    replacement: TensorInfo | None = None
    factors: LoraFactors | None = None
    bias_of: LoraFactors | None = None  # this tensor is a bias that lora_B's bias moves


def _read_adapter_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot be read as JSON ({exc}); re-save the adapter") from exc


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name or its dotted suffix."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            return value
    return default


class LoraAdapter(Expert):
    """A PEFT LoRA adapter folder: adapter_config.json + adapter_model.safetensors."""

    kind = "LoRA adapter"

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.config = _read_adapter_config(self.folder)
        self._check_supported(self.folder / ADAPTER_CONFIG)
        weights = self.folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            refuse_pickles(self.folder, "adapter weights")
            raise CheckpointError(f"{self.folder}: no {ADAPTER_WEIGHTS} beside {ADAPTER_CONFIG}")
        self.changes = self._parse(read_header(weights), weights)

    def _check_supported(self, config_path: Path) -> None:
        peft_type = self.config.get("peft_type")
        if peft_type != "LORA":
            raise CheckpointError(f"{config_path}: peft_type is {peft_type!r}; mergeplan merges LoRA adapters "
                                  "only (merge_and_unload() other PEFT types into full checkpoints first)")
        for field, feature in UNSUPPORTED_LORA_FEATURES.items():
            if self.config.get(field):
                raise CheckpointError(f"{config_path}: {field} is set: {feature} is not supported; "
                                      "merge_and_unload() the adapter into a full checkpoint and merge that")
        for field in ("r", "lora_alpha"):
            value = self.config.get(field)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"{config_path}: {field} is {value!r}; expected a positive number")

    def _scale(self, module: str, rank: int) -> float:
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config["lora_alpha"])
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def _parse(self, header: dict[str, TensorInfo], path: Path) -> dict[str, TensorChange]:
        factors: dict[str, dict[str, TensorInfo]] = {}
        changes: dict[str, TensorChange] = {}
        for key, info in header.items():
            name = key.removeprefix(PEFT_PREFIX)
            match = _FACTOR_KEY.fullmatch(name)
            if match:
                part = match["factor"].replace("embedding_", "") + (match["suffix"] or "")
                factors.setdefault(match["module"], {})[part] = info
            elif ".base_layer." in name:
                changes.setdefault(name.replace(".base_layer.", "."), TensorChange()).replacement = info
            elif name.endswith("lora_magnitude_vector") or ".lora_" in name:
                raise CheckpointError(f"{path}: tensor {key} is not a LoRA factor mergeplan can merge")
            else:
                changes.setdefault(name, TensorChange()).replacement = info
        transposed_linear = bool(self.config.get("fan_in_fan_out"))
        for module, parts in factors.items():
            if "lora_A" not in parts and "lora_A.weight" not in parts:
                raise CheckpointError(f"{path}: {module} has lora_B but no lora_A; re-save the adapter")
            a = parts.get("lora_A.weight") or parts.get("lora_A")
            b = parts.get("lora_B.weight") or parts.get("lora_B")
            if b is None:
                raise CheckpointError(f"{path}: {module} has lora_A but no lora_B; re-save the adapter")
            embedding = "lora_A" in parts  # embeddings store their factors without .weight
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
                raise CheckpointError(f"{path}: {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do "
                                      "not form a low-rank product (conv layers are not supported)")
            lora = LoraFactors(a, b, self._scale(module, a.shape[0]), embedding or transposed_linear,
                               parts.get("lora_B.bias"))
            changes.setdefault(f"{module}.weight", TensorChange()).factors = lora
            if lora.bias is not None:
                changes.setdefault(f"{module}.bias", TensorChange()).bias_of = lora
        return changes

    @property
    def ranks(self) -> list[int]:
        return sorted({c.factors.rank for c in self.changes.values() if c.factors is not None})

    @property
    def target_modules(self) -> list[str]:
        return sorted({name.split(".")[-2] for name, c in self.changes.items() if c.factors is not None})

    def describe(self) -> str:
        ranks = "/".join(map(str, self.ranks)) or "-"
        return f"LoRA r={ranks} on {','.join(self.target_modules) or 'no modules'}"

    def check_compatible(self, base: CheckpointReader) -> None:
        declared = _local_base(self.folder, self.config)
        if declared is not None and declared.resolve() != base.folder.resolve():
            other = json.loads((declared / "config.json").read_text())
            for field in STRUCTURAL_FIELDS:
                if other.get(field) != base.config.get(field):
                    raise CheckpointError(
                        f"{self.folder}/{ADAPTER_CONFIG}: base_model_name_or_path {declared} has {field} "
                        f"{other.get(field)!r}, the base {base.folder} has {base.config.get(field)!r}; this "
                        "adapter was trained on another base")
        saved = set(self.config.get("modules_to_save") or [])
        for name, change in self.changes.items():
            if name not in base.tensors:
                module = name.rsplit(".", 1)[0]
                what = ("modules_to_save " if module.split(".")[-1] in saved else "") + f"tensor {name}"
                raise CheckpointError(f"{self.folder}: adapter {what} has no counterpart in the base {base.folder}; "
                                      "was the adapter trained on another base?")
            shape = base.tensors[name].shape
            if change.replacement is not None and change.replacement.shape != shape:
                raise CheckpointError(f"{self.folder}: adapter tensor {name} has shape "
                                      f"{list(change.replacement.shape)}, the base has {list(shape)}; "
                                      "the adapter was trained on another base")
            if change.factors is not None and change.factors.shape != tuple(shape):
                raise CheckpointError(f"{self.folder}: LoRA factors of {name} make a {list(change.factors.shape)} "
                                      f"update, the base tensor is {list(shape)}; the adapter was trained on "
                                      "another base")

    def load(self, name: str) -> tuple[torch.Tensor | None, ...] | None:
        """(replacement or None, then lora_A and lora_B, or lora_B's bias), as in _infos."""
        change = self.changes.get(name)
        if change is None:
            return None
        return tuple(None if info is None else read_tensor(info) for info in self._infos(change))

    def task_vector(self, name: str, loaded, base_tensor: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        if loaded is None:
            return None
        change = self.changes[name]
        replacement, *factors = loaded
        for tensor, info in zip(loaded, self._infos(change), strict=True):
            if tensor is not None:
                require_finite(tensor, self.folder, info.name)
        if change.factors is not None:
            a, b = factors
            if change.factors.transposed:
                out.copy_(torch.mm(b.float(), a.float()).T)
            else:
                torch.mm(b.float(), a.float(), out=out)
            out.mul_(change.factors.scale)
        elif change.bias_of is not None:
            torch.mul(factors[0].float(), change.bias_of.scale, out=out)
        else:
            out.zero_()
        if replacement is not None:
            out.add_(replacement.float()).sub_(base_tensor)
        return out

    @staticmethod
    def _infos(change: TensorChange) -> list[TensorInfo | None]:
        if change.factors is not None:
            return [change.replacement, change.factors.a, change.factors.b]
        if change.bias_of is not None:
            return [change.replacement, change.bias_of.bias]
        return [change.replacement]


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def open_expert(folder: str | Path, lora: str | Path | None = None) -> Expert:
    """A LoRA adapter when the folder has adapter_config.json, else a full checkpoint; with LORA, that adapter
    applied to the checkpoint FOLDER."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint or adapter folder")
    if lora is not None:
        from merging.lora_on_model import LoraOnModel

        lora = Path(lora)
        if is_adapter(folder):
            raise CheckpointError(f"{folder}: is a LoRA adapter, so the LoRA {lora} cannot be applied to it; "
                                  "MODEL+LORA needs a full checkpoint as MODEL")
        if not lora.is_dir():
            raise CheckpointError(f"{lora}: no such LoRA adapter folder (to apply to {folder})")
        if not is_adapter(lora):
            raise CheckpointError(f"{lora}: no {ADAPTER_CONFIG}, so not a PEFT LoRA adapter to apply to {folder}")
        return LoraOnModel(folder, lora)
    return LoraAdapter(folder) if is_adapter(folder) else FullCheckpoint(folder)


def log_mixed_adapters(experts: list[Expert]) -> None:
    """Adapters of different ranks or target modules merge fine (each τ is dense per tensor): say so."""
    kinds = {e.describe() for e in experts}
    if len(kinds) > 1:
        log.info("experts differ in kind, rank or target modules (%s); each task vector is computed per "
                 "tensor, so they merge as usual", "; ".join(sorted(kinds)))


def _local_base(folder: Path, config: dict) -> Path | None:
    """The local folder with a config.json that base_model_name_or_path names, relative to the adapter or the cwd."""
    declared = config.get("base_model_name_or_path")
    if not declared:
        return None
    for candidate in (folder / declared, Path(declared)):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def declared_base(folder: str | Path) -> Path | None:
    """The local base folder an adapter names (read from adapter_config.json alone); None for a checkpoint."""
    folder = Path(folder)
    if not is_adapter(folder):
        return None
    return _local_base(folder, _read_adapter_config(folder))


def load_expert_model(folder: str | Path, base: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """A causal LM with the expert's weights: a checkpoint as it is, an adapter applied to `base` (default: the
    local folder its base_model_name_or_path names)."""
    from merging.io.hf_loading import load_causal_lm

    folder = Path(folder)
    if not is_adapter(folder):
        return load_causal_lm(folder, dtype)
    base = Path(base) if base is not None else declared_base(folder)
    if base is None:
        raise CheckpointError(f"{folder}: a LoRA adapter needs its base model: pass --base FOLDER (its "
                              "base_model_name_or_path names no local folder)")
    adapter = LoraAdapter(folder)
    reader = CheckpointReader(base)
    adapter.check_compatible(reader)
    model = load_causal_lm(base, dtype)
    state = model.state_dict()
    with torch.no_grad():
        for name in adapter.changes:
            if name not in state:
                raise CheckpointError(f"{folder}: tensor {name} has no counterpart in the model loaded from {base}")
            state[name].copy_(adapter.weights(name, reader).to(state[name].dtype))
    return model
