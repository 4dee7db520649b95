"""Learned coefficients as data: coefficients.json (every α by tensor, chunk and expert) and its heatmap."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from merging.calibration.components import split
from merging.config import MergeConfig, parse_config
from merging.errors import ConfigError

# 3: a tensor's coefficients may be one per LoRA component ("components"); 2: chunks are blocks of whole rows;
# 1 cut the flattened tensor anywhere. A file without components is written as format 2, which older readers apply.
COEFFICIENTS_FORMAT = 3
ROW_BLOCK_FORMAT = 2
LAYER_WISE_FORMATS = {1}
COEFFICIENTS_FILE = "coefficients.json"
COEFFICIENTS_PLOT = "coefficients.png"
CALIBRATION_FILE = "calibration.json"  # older formats read as long as every tensor has one chunk (the same merge)


@dataclass
class Coefficients:
    """alpha[tensor] is (K, chunks): θ = θ0 + Σk Σs alpha[tensor][k, s] · τk[chunk s]; or, for a tensor in
    `ranks`, (R,): one per LoRA component, expert by expert (calibration/components.py): θ = θ0 + Σk
    B_k·diag(α_k·s_k)·A_k."""

    config: MergeConfig  # the merge that produced them: base, experts (in order), method, params
    expert_names: list[str]
    alpha: dict[str, torch.Tensor]
    trained: dict[str, bool] = field(default_factory=dict)  # False: held fixed (EM++ tensors with no chunk)
    ranks: dict[str, list[int]] = field(default_factory=dict)  # per-component tensors: components per expert

    def to_json(self) -> dict[str, Any]:
        config = self.config.model_copy(update={
            "base": self.config.base.resolve(),
            "experts": [e.model_copy(update={"path": e.path.resolve()}) for e in self.config.experts],
            "calibration": {name: path.resolve() for name, path in self.config.calibration.items()},
            "out": None})
        return {
            "format": COEFFICIENTS_FORMAT if self.ranks else ROW_BLOCK_FORMAT,
            "config": config.model_dump(mode="json", by_alias=True),
            "experts": self.expert_names,
            "tensors": {name: self._entry(name, alpha) for name, alpha in self.alpha.items()},
        }

    def _entry(self, name: str, alpha: torch.Tensor) -> dict[str, Any]:
        if name not in self.ranks:
            return {"chunks": alpha.shape[1], "trained": self.trained.get(name, True),
                    "alpha": {expert: alpha[k].tolist() for k, expert in enumerate(self.expert_names)}}
        parts = split(alpha, self.ranks[name])
        return {"components": dict(zip(self.expert_names, self.ranks[name], strict=True)),
                "trained": self.trained.get(name, True),
                "alpha": {expert: parts[k].tolist() for k, expert in enumerate(self.expert_names)}}

    def expert_alpha(self, name: str) -> list[torch.Tensor]:
        """Each expert's coefficients of tensor `name`: (chunks,), or (r_k,) components."""
        alpha = self.alpha[name]
        return split(alpha, self.ranks[name]) if name in self.ranks else list(alpha)

    @classmethod
    def from_json(cls, data: Any, source: str) -> Coefficients:
        known = {COEFFICIENTS_FORMAT, ROW_BLOCK_FORMAT} | LAYER_WISE_FORMATS
        version = data.get("format") if isinstance(data, dict) else None
        if isinstance(version, int) and not isinstance(version, bool) and version > COEFFICIENTS_FORMAT:
            raise ConfigError(f"{source}: coefficients format {version} is newer than this mergeplan reads (formats "
                              f"1-{COEFFICIENTS_FORMAT}); upgrade mergeplan to apply it")
        if not isinstance(data, dict) or version not in known or "tensors" not in data:
            raise ConfigError(f"{source}: not a mergeplan coefficients.json (format {COEFFICIENTS_FORMAT})")
        if data["format"] in LAYER_WISE_FORMATS:
            chunked = [t for t, entry in data["tensors"].items() if entry.get("chunks", 1) != 1]
            if chunked:
                raise ConfigError(f"{source}: format {data['format']} cut {chunked[0]} into chunks anywhere in the "
                                  "flattened tensor; chunks are now blocks of whole rows: calibrate again")
        config = parse_config(data.get("config"), f"{source}: config")
        names = data["experts"]
        alpha, trained, ranks = {}, {}, {}
        for tensor, entry in data["tensors"].items():
            missing = [name for name in names if name not in entry["alpha"]]
            if missing:
                raise ConfigError(f"{source}: tensors.{tensor}.alpha: no coefficients for expert {missing[0]}")
            rows = [entry["alpha"][name] for name in names]
            if "components" in entry:
                if data["format"] < COEFFICIENTS_FORMAT:
                    raise ConfigError(f"{source}: tensors.{tensor}: per-component coefficients need format "
                                      f"{COEFFICIENTS_FORMAT}, the file says {data['format']}")
                ranks[tensor] = _ranks(entry["components"], names, rows, f"{source}: tensors.{tensor}")
                alpha[tensor] = torch.tensor([a for row in rows for a in row], dtype=torch.float32)
            else:
                if any(len(row) != entry["chunks"] for row in rows):
                    raise ConfigError(f"{source}: tensors.{tensor}: expected {entry['chunks']} chunk coefficients "
                                      "per expert")
                alpha[tensor] = torch.tensor(rows, dtype=torch.float32)
            trained[tensor] = bool(entry.get("trained", True))
        return cls(config, names, alpha, trained, ranks)

    @classmethod
    def load(cls, path: str | Path) -> Coefficients:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read coefficients ({exc.strerror})") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        return cls.from_json(data, str(path))

    def warm_start(self, expert_names: list[str], names: list[str], init: float, source: str,
                   ranks: dict[str, list[int]] | None = None) -> Coefficients:
        """These coefficients as the start of a calibration over `expert_names` and tensors `names`: rows matched
        by expert name, experts they lack at `init`, tensors they lack layer-wise at `init`. RANKS: this run's
        components per expert of its per-component tensors (where earlier components are kept, they must
        match; a new expert's start at `init`)."""
        unknown = [name for name in self.expert_names if name not in expert_names]
        if unknown:
            raise ConfigError(f"{source}: params.warm_start: expert {unknown[0]!r} of the earlier calibration is not "
                              "among this merge's experts; a warm start adds experts to an earlier merge: start "
                              "cold (remove warm_start) to drop one")
        alpha, trained, kept_ranks = {}, {}, {}
        for name in names:
            earlier = self.alpha.get(name)
            trained[name] = self.trained.get(name, True)
            if earlier is not None and name in self.ranks:
                if name not in (ranks or {}):
                    raise ConfigError(f"{source}: params.warm_start: {name} has per-component coefficients, but "
                                      "this run gives it one α per tensor; set params.coefficients: rank (with the "
                                      "same adapters), or start cold")
                kept_ranks[name] = ranks[name]
                alpha[name] = self._warm_components(name, expert_names, kept_ranks[name], init, source)
                continue
            chunks = 1 if earlier is None else earlier.shape[1]
            rows = [earlier[self.expert_names.index(e)] if earlier is not None and e in self.expert_names
                    else torch.full((chunks,), init) for e in expert_names]
            alpha[name] = torch.stack(rows).float()
        return Coefficients(self.config, expert_names, alpha, trained, kept_ranks)

    def _warm_components(self, name: str, expert_names: list[str], ranks: list[int], init: float,
                         source: str) -> torch.Tensor:
        parts = dict(zip(self.expert_names, self.expert_alpha(name), strict=True))
        starts = []
        for expert, rank in zip(expert_names, ranks, strict=True):
            part = parts.get(expert, torch.full((rank,), init))
            if part.numel() != rank:
                raise ConfigError(f"{source}: params.warm_start: tensors.{name}.alpha.{expert} has {part.numel()} "
                                  f"component coefficients, the adapter now has rank {rank} there; start cold")
            starts.append(part)
        return torch.cat(starts).float()

    def layerwise_means(self) -> torch.Tensor:
        """(tensors, K): each tensor's coefficient per expert, averaged over its chunks or components (NaN for an
        expert with no component on a tensor)."""
        return torch.stack([torch.stack([part.mean() if part.numel() else torch.tensor(float("nan"))
                                         for part in self.expert_alpha(name)]) for name in self.alpha])

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        values = self.layerwise_means().numpy()
        names = [_short(name) + self._suffix(name) for name in self.alpha]
        figure, axes = plt.subplots(figsize=(2.5 + 0.7 * len(self.expert_names), 1.5 + 0.2 * len(names)))
        top = float(np.nanmax(values)) if np.isfinite(values).any() else 0.0
        image = axes.imshow(values, cmap="magma", aspect="auto", vmin=0, vmax=max(1e-6, top))
        axes.set_xticks(range(len(self.expert_names)), self.expert_names, rotation=45, ha="right")
        axes.set_yticks(range(len(names)), names, fontsize=7)
        figure.colorbar(image, label="α (mean over ×m chunks, ×r components)")
        axes.set_title(f"{self.config.method}: learned coefficients")
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)


    def _suffix(self, name: str) -> str:
        if name in self.ranks:
            return " ×r" if self.trained.get(name, True) else ""
        chunks = self.alpha[name].shape[1]
        return "" if chunks == 1 else f" ×{chunks}"


def _ranks(counts: Any, names: list[str], rows: list[Any], where: str) -> list[int]:
    """A per-component entry's components per expert, checked against its coefficients."""
    if not isinstance(counts, dict) or any(name not in counts for name in names):
        raise ConfigError(f"{where}.components: expected the number of components of every expert")
    ranks = []
    for name, row in zip(names, rows, strict=True):
        count = counts[name]
        if not isinstance(count, int) or isinstance(count, bool) or count < 0 or not isinstance(row, list) \
                or len(row) != count:
            raise ConfigError(f"{where}.alpha.{name}: expected {count} component coefficients")
        ranks.append(count)
    return ranks


def _short(name: str) -> str:
    return name.removeprefix("model.").removesuffix(".weight").replace("layers.", "L")


def write_calibration_artifacts(writer, coefficients: Coefficients, report: dict | None,
                                kept: dict[int, Coefficients] | None) -> None:
    """What every calibrated output folder holds beside the weights (into a CheckpointWriter's staging folder):
    coefficients.json and its heatmap, calibration.json, and the coefficients after each kept epoch."""
    writer.write_json(COEFFICIENTS_FILE, coefficients.to_json())
    coefficients.plot(writer.staged(COEFFICIENTS_PLOT))
    if report is not None:
        writer.write_json(CALIBRATION_FILE, report)
    for epoch, earlier in (kept or {}).items():
        writer.write_json(f"epochs/coefficients-epoch-{epoch}.json", earlier.to_json())
