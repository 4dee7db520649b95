"""mergekit's `slices:` read: sources that share each slice's layer range are an ordinary merge with settings by
layer range; sources of other ranges are a stack of layers (passthrough).

A slice is {sources: [{model, layer_range: [start, end], parameters}], parameters}. When every source of every
slice spans the slice's one range, and every slice lists the same models, the merge is the models' merge with
each slice's parameters (and each source's) applying to its layers, as mergekit applies them; gradients run over
each slice's own layers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from merging.errors import ConfigError
from merging.parameters import LayerSlice

SLICE_FIELDS = {"sources", "parameters", "base_model", "residual_weight"}
SOURCE_FIELDS = {"model", "layer_range", "parameters"}


def known_fields(fields: dict, allowed: set[str], where: str, source: str, what: str) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ConfigError(f"{source}: {where}{unknown[0]}: {what} (it takes {', '.join(sorted(allowed)) or 'none'})")


def mapping(value: Any, field: str, source: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {field}: expected a mapping of parameter names to values")
    return dict(value)


def model_name(entry: Any, field: str, source: str) -> str:
    model = entry.get("model") if isinstance(entry, dict) else None
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{source}: {field}.model: expected a checkpoint folder path or a hub id")
    return model


class Inputs:
    """The models a config merges, in order, with their settings; the base among them or not."""

    def __init__(self, names: list[str], own: list[dict], base: str | None):
        self.names, self.own, self.base = names, own, base


class Source(NamedTuple):
    model: str
    layers: tuple[int, int] | None  # None: every layer
    params: dict[str, Any]


class StackedSlice(NamedTuple):
    """Layers [start, end) of one model, in the order a passthrough stacks them."""

    source: Source
    params: dict[str, Any]


def _layer_range(value: Any, field: str, source: str) -> tuple[int, int]:
    if (not isinstance(value, list | tuple) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value) or not 0 <= value[0] < value[1]):
        raise ConfigError(f"{source}: {field}: expected [start, end] with 0 <= start < end (layers start..end-1)")
    return value[0], value[1]


def _sources(piece: dict, s: int, data: dict, allowed: set[str], source: str) -> tuple[list[Source], dict]:
    if not isinstance(piece, dict):
        raise ConfigError(f"{source}: slices[{s}]: expected {{sources: [...], parameters: {{...}}}}")
    known_fields(piece, SLICE_FIELDS, f"slices[{s}].", source, "not a field of a slice")
    if piece.get("base_model") not in (None, data.get("base_model")):
        raise ConfigError(f"{source}: slices[{s}].base_model: a base of its own per slice is not supported; give one "
                          "base_model for the whole merge")
    if piece.get("residual_weight") is not None:
        raise ConfigError(f"{source}: slices[{s}].residual_weight: not supported (mergekit's own planner ignores it "
                          "too); remove it")
    entries = piece.get("sources")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: slices[{s}].sources: expected a list of {{model, layer_range}}")
    sources = []
    for j, entry in enumerate(entries):
        field = f"slices[{s}].sources[{j}]"
        model = model_name(entry, field, source)
        known_fields(entry, SOURCE_FIELDS, f"{field}.", source, "not a field of a slice source")
        params = mapping(entry.get("parameters"), f"{field}.parameters", source)
        known_fields(params, allowed, f"{field}.parameters.", source, f"{data['merge_method']} takes no such parameter")
        sources.append(Source(model, _layer_range(entry.get("layer_range"), f"{field}.layer_range", source), params))
    params = mapping(piece.get("parameters"), f"slices[{s}].parameters", source)
    known_fields(params, allowed, f"slices[{s}].parameters.", source, f"{data['merge_method']} takes no such parameter")
    return sources, params


def stacked_slices(data: dict, allowed: set[str], source: str) -> list[StackedSlice]:
    """passthrough's slices: exactly one source each, stacked in order."""
    pieces = data["slices"]
    if not isinstance(pieces, list) or not pieces:
        raise ConfigError(f"{source}: slices: expected a list of {{sources: [...]}}")
    stack = []
    for s, piece in enumerate(pieces):
        sources, params = _sources(piece, s, data, allowed, source)
        if len(sources) != 1:
            raise ConfigError(f"{source}: slices[{s}].sources: passthrough copies one source per slice; got "
                              f"{len(sources)} (merge them with another method, or give each its own slice)")
        stack.append(StackedSlice(sources[0], params))
    return stack


def read_slices(data: dict, allowed: set[str], source: str):
    """(inputs, layer slices, None) for slices that are an ordinary merge; (inputs, [], stack) for a stack."""
    pieces = data["slices"]
    if not isinstance(pieces, list) or not pieces:
        raise ConfigError(f"{source}: slices: expected a list of {{sources: [...]}}")
    parsed = [_sources(piece, s, data, allowed, source) for s, piece in enumerate(pieces)]
    models = [src.model for src in parsed[0][0]]
    ordinary = all(len({src.layers for src in sources}) == 1 and sorted(src.model for src in sources) == sorted(models)
                   for sources, _ in parsed)
    if not ordinary:
        stack = [StackedSlice(src, params) for sources, params in parsed for src in sources]
        return Inputs([src.model for src, _ in stack], [{} for _ in stack], data.get("base_model")), [], stack
    for s, (sources, _) in enumerate(parsed):
        if len({src.model for src in sources}) != len(sources):
            raise ConfigError(f"{source}: slices[{s}].sources: a model is listed twice in one slice")
    slices = [LayerSlice(layers=sources[0].layers, params=params,
                         experts=[next(src.params for src in sources if src.model == model) for model in models])
              for sources, params in parsed]
    return Inputs(models, [{} for _ in models], data.get("base_model")), slices, None
