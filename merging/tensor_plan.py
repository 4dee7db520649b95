"""The method each tensor is merged with: the config's settings resolved for that tensor (merging/parameters.py),
validated by the method's params, with each expert's weight and sparsifier.

Every merged tensor is resolved before anything is read, so a bad value anywhere is one line naming the tensor
and the field, and nothing is written. Methods are built once per distinct set of values.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from merging.config import MergeConfig
from merging.errors import ConfigError
from merging.methods import MergeMethod, build_method, method_class
from merging.methods.group import GroupMethod
from merging.parameters import PER_EXPERT, ParameterPlan, layer_count

AnyMethod = MergeMethod | GroupMethod


class TensorMerge(NamedTuple):
    method: AnyMethod  # the tensor's shared parameters (and per-expert ones at the config's values)
    sparsifiers: list[AnyMethod]  # per expert: the method with that expert's density, gamma, epsilon
    weights: list[float]

    @property
    def total_weight(self) -> float:
        return sum(self.weights)


def _split(method_class: type[AnyMethod]) -> tuple[list[str], list[str]]:
    """The method's shared and per-expert parameter names, each field under its name and its alias."""
    fields = [name for key, field in method_class.Params.model_fields.items()
              for name in dict.fromkeys((key, field.alias or key))]
    return [f for f in fields if f not in PER_EXPERT], [f for f in fields if f in PER_EXPERT]


class TensorPlan:
    """TensorMerge per tensor name, for the merged tensors of a base."""

    def __init__(self, config: MergeConfig, names: list[str], all_names: list[str], source: str):
        self.config, self.source = config, source
        self.method_class = method_class(config.method, source)
        shared, per_expert = _split(self.method_class)
        known = {*shared, *per_expert, "weight"}
        for key in config.params:
            if key not in known:
                raise ConfigError(f"{source}: params.{key}: {config.method} takes no such parameter (it takes "
                                  f"{', '.join(sorted(known - {'weight'})) or 'none'})")
        for i, expert in enumerate(config.experts):
            for key in expert.params:
                if key not in {*per_expert, "weight"}:
                    raise ConfigError(f"{source}: experts.{i}.params.{key}: {config.method} takes no such per-expert "
                                      f"parameter (it takes {', '.join(['weight', *per_expert])})")
        settings = ParameterPlan(config.params, [e.params for e in config.experts], [e.weight for e in config.experts],
                                 config.slices, layer_count(all_names), source)
        settings.warn_unmatched_filters(names)
        self.uniform = settings.is_uniform
        self._built: dict[str, AnyMethod] = {}
        self._tensors: dict[str, TensorMerge] = {}
        for name in names:
            values = settings.resolve(name, shared, per_expert)
            self._tensors[name] = self._bind(name, values.shared, values.experts)

    def _method(self, values: dict, name: str) -> AnyMethod:
        key = json.dumps(values, sort_keys=True)
        if key not in self._built:
            try:
                self._built[key] = build_method(self.config.method, values, self.config.seed, self.source)
            except ConfigError as exc:
                raise ConfigError(str(exc) if self.uniform else f"{exc} (tensor {name})") from exc
        return self._built[key]

    def _weight(self, i: int, weight: object, name: str) -> float:
        where = f"{self.source}: experts.{i}.weight" + ("" if self.uniform else f" (tensor {name})")
        method = self.method_class
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ConfigError(f"{where}: expected a number, got {weight!r}")
        if not method.takes_weights and weight != 1:
            raise ConfigError(f"{where}: {method.name} has no per-expert weight; remove it (or set 1)")
        if weight < 0 and not method.allows_negative_weights:
            raise ConfigError(f"{where}: {weight} is negative; {method.name} takes weights of 0 or more")
        return float(weight)

    def _bind(self, name: str, shared: dict, experts: list[dict]) -> TensorMerge:
        weights = [self._weight(i, values.pop("weight"), name) for i, values in enumerate(experts)]
        sparsifiers = [self._method(shared | values, name) for values in experts]
        method = self._method(shared | (experts[0] if experts else {}), name)
        if (getattr(method.params, "normalize", False) or self.method_class.name == "average") and sum(weights) == 0:
            raise ConfigError(f"{self.source}: experts: the weights sum to 0" + ("" if self.uniform else
                              f" for tensor {name}") + ", so they cannot be normalized")
        return TensorMerge(method, sparsifiers, weights)

    def __getitem__(self, name: str) -> TensorMerge:
        return self._tensors[name]

    def methods(self) -> list[AnyMethod]:
        """Every distinct method built (one when the parameters are the same for every tensor)."""
        return list(self._built.values())


class FixedMethod:
    """One method, built by the caller, for every tensor, with the experts' own weights (learned coefficients)."""

    def __init__(self, method: MergeMethod, weights: list[float]):
        self.method_class = type(method)
        self._merge = TensorMerge(method, [method] * len(weights), weights)

    def __getitem__(self, name: str) -> TensorMerge:
        return self._merge

    def methods(self) -> list[AnyMethod]:
        return [self._merge.method]
