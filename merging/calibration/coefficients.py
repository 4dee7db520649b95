"""Learned coefficients as data: coefficients.json (every α by tensor, chunk and expert) and its heatmap."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merging.config import MergeConfig, parse_config
from merging.errors import ConfigError

COEFFICIENTS_FORMAT = 2  # 2: chunks are blocks of whole rows; 1 cut the flattened tensor anywhere
LAYER_WISE_FORMATS = {1}
COEFFICIENTS_FILE = "coefficients.json"
COEFFICIENTS_PLOT = "coefficients.png"
CALIBRATION_FILE = "calibration.json"  # older formats read as long as every tensor has one chunk (the same merge)


@dataclass
class Coefficients:
    """alpha[tensor] is (K, chunks): θ = θ0 + Σk Σs alpha[tensor][k, s] · τk[chunk s]."""

    config: MergeConfig  # the merge that produced them: base, experts (in order), method, params
    expert_names: list[str]
    alpha: dict[str, torch.Tensor]
    trained: dict[str, bool] = field(default_factory=dict)  # False: held fixed (EM++ tensors with no chunk)

    def to_json(self) -> dict[str, Any]:
        config = self.config.model_copy(update={
            "base": self.config.base.resolve(),
            "experts": [e.model_copy(update={"path": e.path.resolve()}) for e in self.config.experts],
            "calibration": {name: path.resolve() for name, path in self.config.calibration.items()},
            "out": None})
        return {
            "format": COEFFICIENTS_FORMAT,
            "config": config.model_dump(mode="json", by_alias=True),
            "experts": self.expert_names,
            "tensors": {name: {"chunks": alpha.shape[1], "trained": self.trained.get(name, True),
                               "alpha": {expert: alpha[k].tolist() for k, expert in enumerate(self.expert_names)}}
                        for name, alpha in self.alpha.items()},
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> Coefficients:
        known = {COEFFICIENTS_FORMAT} | LAYER_WISE_FORMATS
        if not isinstance(data, dict) or data.get("format") not in known or "tensors" not in data:
            raise ConfigError(f"{source}: not a mergeplan coefficients.json (format {COEFFICIENTS_FORMAT})")
        if data["format"] in LAYER_WISE_FORMATS:
            chunked = [t for t, entry in data["tensors"].items() if entry.get("chunks", 1) != 1]
            if chunked:
                raise ConfigError(f"{source}: format {data['format']} cut {chunked[0]} into chunks anywhere in the "
                                  "flattened tensor; chunks are now blocks of whole rows: calibrate again")
        config = parse_config(data.get("config"), f"{source}: config")
        names = data["experts"]
        alpha, trained = {}, {}
        for tensor, entry in data["tensors"].items():
            missing = [name for name in names if name not in entry["alpha"]]
            if missing:
                raise ConfigError(f"{source}: tensors.{tensor}.alpha: no coefficients for expert {missing[0]}")
            rows = [entry["alpha"][name] for name in names]
            if any(len(row) != entry["chunks"] for row in rows):
                raise ConfigError(f"{source}: tensors.{tensor}: expected {entry['chunks']} chunk coefficients "
                                  "per expert")
            alpha[tensor] = torch.tensor(rows, dtype=torch.float32)
            trained[tensor] = bool(entry.get("trained", True))
        return cls(config, names, alpha, trained)

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

    def warm_start(self, expert_names: list[str], names: list[str], init: float, source: str) -> Coefficients:
        """These coefficients as the start of a calibration over `expert_names` and tensors `names`: rows matched
        by expert name, experts they lack at `init`, tensors they lack layer-wise at `init`."""
        unknown = [name for name in self.expert_names if name not in expert_names]
        if unknown:
            raise ConfigError(f"{source}: params.warm_start: expert {unknown[0]!r} of the earlier calibration is not "
                              "among this merge's experts; a warm start adds experts to an earlier merge: start "
                              "cold (remove warm_start) to drop one")
        alpha, trained = {}, {}
        for name in names:
            earlier = self.alpha.get(name)
            chunks = 1 if earlier is None else earlier.shape[1]
            rows = [earlier[self.expert_names.index(e)] if earlier is not None and e in self.expert_names
                    else torch.full((chunks,), init) for e in expert_names]
            alpha[name] = torch.stack(rows).float()
            trained[name] = self.trained.get(name, True)
        return Coefficients(self.config, expert_names, alpha, trained)

    def layerwise_means(self) -> torch.Tensor:
        """(tensors, K): each tensor's coefficient per expert, averaged over its chunks."""
        return torch.stack([alpha.mean(dim=1) for alpha in self.alpha.values()])

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        values = self.layerwise_means().numpy()
        names = [_short(name) + ("" if self.alpha[name].shape[1] == 1 else f" ×{self.alpha[name].shape[1]}")
                 for name in self.alpha]
        figure, axes = plt.subplots(figsize=(2.5 + 0.7 * len(self.expert_names), 1.5 + 0.2 * len(names)))
        image = axes.imshow(values, cmap="magma", aspect="auto", vmin=0, vmax=max(1e-6, float(values.max())))
        axes.set_xticks(range(len(self.expert_names)), self.expert_names, rotation=45, ha="right")
        axes.set_yticks(range(len(names)), names, fontsize=7)
        figure.colorbar(image, label="α (mean over chunks where ×m)")
        axes.set_title(f"{self.config.method}: learned coefficients")
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)


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
