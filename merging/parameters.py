"""Parameters that vary by tensor: a value, a gradient over the layers, or conditionals on the tensor's name.

A setting is what a config gives for one parameter, with mergekit's semantics:
- a scalar: that value everywhere;
- a list of numbers (a gradient): interpolated linearly at the tensor's position t in [0, 1]
  (t = i / (n - 1) for layer i of a slice of n layers, 1 for a one-layer slice, 0 outside the layers); a list of
  booleans or strings picks element int(t·(n - 1));
- a list of {filter, value} (or one): the first whose filter is absent, `*` or a substring of the tensor's name
  gives the value (itself a scalar or a gradient); none matching leaves the parameter to the next scope.
Scopes, most specific first: a slice's settings for one expert, the expert's own (`experts[i].params`), the
slice's, the config's `params`; then the expert's `weight` and the method's defaults. Per-expert parameters
(weight and the sparsifiers' density, gamma, epsilon) take every scope; the others only the slice's and the
config's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from merging.errors import ConfigError

log = logging.getLogger("mergeplan")
PER_EXPERT = ("weight", "density", "gamma", "epsilon")
SCALARS = (bool, int, float, str)
LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
# outside the layers, these come after them (mergekit's "post" weights take the last slice's settings)
AFTER_LAYERS = re.compile(r"^(?:lm_head|(?:model\.)?(?:norm|final_layernorm|ln_f)\.)")


class LayerSlice(BaseModel):
    """Layers [start, end) of the base, merged from the same layers of every expert, with settings of their own."""

    model_config = ConfigDict(extra="forbid")
    layers: tuple[int, int]
    params: dict[str, Any] = Field(default_factory=dict)
    experts: list[dict[str, Any]] = Field(default_factory=list)  # per expert, in the config's order (may be empty)


class StackedRange(BaseModel):
    """Layers [start, end) of experts[expert], stacked (passthrough), with a `scale` setting."""

    model_config = ConfigDict(extra="forbid")
    expert: int
    layers: tuple[int, int] | None = None  # None: every layer of the model
    params: dict[str, Any] = Field(default_factory=dict)


class Position(NamedTuple):
    slice: int  # index into the slices
    t: float  # where the tensor lies in its slice, for gradients


class TensorParams(NamedTuple):
    shared: dict[str, Any]  # the method's parameters for this tensor
    experts: list[dict[str, Any]]  # per expert: its weight and per-expert parameters for this tensor


def is_plain(setting: Any) -> bool:
    return isinstance(setting, SCALARS) or setting is None


def _conditionals(setting: Any) -> list[dict] | None:
    if isinstance(setting, dict) and "value" in setting:
        return [setting]
    if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
        return setting
    return None


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """SETTING's value for TENSOR_NAME at position T (None: no conditional matched)."""
    if is_plain(setting):
        return setting
    conditionals = _conditionals(setting)
    if conditionals is not None:
        for condition in conditionals:
            where = condition.get("filter")
            if where is None or where == "*" or where in tensor_name:
                return evaluate(condition["value"], tensor_name, t)
        return None
    values = list(setting)
    if not values:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    fraction = scaled - low
    return (1 - fraction) * values[low] + fraction * values[high]


def check_setting(setting: Any, field: str, layers: int) -> None:
    """A setting's shape: scalars, a gradient no longer than the layers it spans, or {filter, value} entries."""
    if is_plain(setting):
        return
    conditionals = _conditionals(setting)
    if conditionals is not None:
        for i, condition in enumerate(conditionals):
            unknown = set(condition) - {"filter", "value"}
            if unknown:
                raise ConfigError(f"{field}[{i}]: {sorted(unknown)[0]}: not a field of a conditional (it takes "
                                  "filter and value)")
            if condition.get("filter") is not None and not isinstance(condition["filter"], str):
                raise ConfigError(f"{field}[{i}].filter: expected a substring of tensor names")
            check_setting(condition["value"], f"{field}[{i}].value", layers)
        return
    if not isinstance(setting, list) or not setting or not all(isinstance(v, SCALARS) for v in setting):
        raise ConfigError(f"{field}: expected a value, a list of values (a gradient over the layers) or a list "
                          "of {filter, value}")
    if len(setting) > max(layers, 1):
        raise ConfigError(f"{field}: a gradient of {len(setting)} values over {layers} layers; give at most one "
                          "value per layer")


def filters(setting: Any) -> Iterable[str]:
    """Every filter a setting names."""
    for condition in _conditionals(setting) or []:
        if condition.get("filter") not in (None, "*"):
            yield condition["filter"]
        yield from filters(condition["value"])


def layer_count(names: Iterable[str]) -> int:
    """Layers in a checkpoint: one more than the largest layer index in its tensor names (0 without layers)."""
    indices = [int(match.group(1)) for name in names if (match := LAYER.search(name))]
    return max(indices) + 1 if indices else 0


def position(name: str, slices: list[tuple[int, int]]) -> Position:
    """Which slice a tensor's settings come from, and its t there."""
    match = LAYER.search(name)
    if match is None:
        return Position(len(slices) - 1 if AFTER_LAYERS.match(name) else 0, 0.0)
    layer = int(match.group(1))
    for index, (start, end) in enumerate(slices):
        if start <= layer < end:
            return Position(index, (layer - start) / (end - start - 1) if end - start > 1 else 1.0)
    raise ConfigError(f"tensor {name}: layer {layer} lies in no slice; the slices must cover every layer")


def _check_cover(ranges: list[tuple[int, int]], layers: int, source: str) -> None:
    """Slices of an ordinary merge cover the base's layers once each, in order."""
    end = 0
    for s, (start, stop) in enumerate(ranges):
        if stop > layers:
            raise ConfigError(f"{source}: slices.{s}.layers: [{start}, {stop}] is out of bounds: the base has {layers} "
                              "layers")
        if start != end:
            raise ConfigError(f"{source}: slices.{s}.layers: starts at layer {start}, not {end}; the slices of a merge "
                              "cover every layer of the base once, in order (stack layers with passthrough)")
        end = stop
    if end != layers:
        raise ConfigError(f"{source}: slices: they end at layer {end} of the base's {layers}; the slices of a merge "
                          "cover every layer once (stack layers with passthrough)")


class ParameterPlan:
    """Resolves a merge's settings for each tensor (see the module docstring)."""

    def __init__(self, params: dict[str, Any], expert_params: list[dict[str, Any]], weights: list[float],
                 slices: list[LayerSlice], layers: int, source: str):
        self.params, self.expert_params, self.weights = params, expert_params, weights
        self.slices = slices or [LayerSlice(layers=(0, max(layers, 1)))]
        self.ranges = [tuple(s.layers) for s in self.slices]
        self.source = source
        if slices:
            _check_cover(self.ranges, layers, source)
        for name, setting in params.items():
            check_setting(setting, f"{source}: params.{name}", layers)
        for i, own in enumerate(expert_params):
            for name, setting in own.items():
                if name not in PER_EXPERT:
                    raise ConfigError(f"{source}: experts.{i}.params.{name}: not a per-expert parameter (those are "
                                      f"{', '.join(PER_EXPERT)}); give it once for the merge under params:")
                check_setting(setting, f"{source}: experts.{i}.params.{name}", layers)
        for s, piece in enumerate(self.slices):
            span = piece.layers[1] - piece.layers[0]
            for name, setting in piece.params.items():
                check_setting(setting, f"{source}: slices.{s}.params.{name}", span)
            for i, own in enumerate(piece.experts):
                for name, setting in own.items():
                    check_setting(setting, f"{source}: slices.{s}.experts.{i}.{name}", span)

    @property
    def is_uniform(self) -> bool:
        """Whether every tensor gets the same parameters (no gradient, no filter, one slice without settings)."""
        return (len(self.slices) == 1 and not self.slices[0].params and not any(self.slices[0].experts)
                and all(is_plain(v) for v in self.params.values())
                and all(is_plain(v) for own in self.expert_params for v in own.values()))

    def filters(self) -> list[tuple[str, str]]:
        """(field, filter) for every filter the settings name."""
        scopes = [(f"params.{n}", v) for n, v in self.params.items()]
        scopes += [(f"experts.{i}.params.{n}", v) for i, own in enumerate(self.expert_params) for n, v in own.items()]
        for s, piece in enumerate(self.slices):
            scopes += [(f"slices.{s}.params.{n}", v) for n, v in piece.params.items()]
            scopes += [(f"slices.{s}.experts.{i}.{n}", v) for i, own in enumerate(piece.experts)
                       for n, v in own.items()]
        return [(field, found) for field, setting in scopes for found in filters(setting)]

    def warn_unmatched_filters(self, names: list[str]) -> None:
        for field, found in self.filters():
            if not any(found in name for name in names):
                log.warning("%s: %s: filter %r matches no tensor name; it changes nothing", self.source, field, found)

    def _first(self, scopes: list[dict[str, Any]], key: str, name: str, t: float) -> Any:
        for scope in scopes:
            if key in scope:
                value = evaluate(scope[key], name, t)
                if value is not None:
                    return value
        return None

    def resolve(self, name: str, shared_names: Iterable[str], expert_names: Iterable[str]) -> TensorParams:
        """Tensor NAME's values of the method's SHARED_NAMES and, per expert, of EXPERT_NAMES (weight always);
        a parameter no scope sets is left out (its default applies)."""
        where = position(name, self.ranges)
        piece = self.slices[where.slice]
        shared = {key: value for key in shared_names
                  if (value := self._first([piece.params, self.params], key, name, where.t)) is not None}
        experts = []
        for i, own in enumerate(self.expert_params):
            in_slice = piece.experts[i] if i < len(piece.experts) else {}
            scopes = [in_slice, own, piece.params, self.params]
            values = {key: value for key in ("weight", *expert_names)
                      if (value := self._first(scopes, key, name, where.t)) is not None}
            values.setdefault("weight", self.weights[i])
            experts.append(values)
        return TensorParams(shared, experts)
