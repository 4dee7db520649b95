"""mergekit YAML files read as merge configs: every field a mergekit 0.1.5 config can carry, with its semantics.

What is mapped, and how (docs/merging.md has the table):
- methods: each of mergekit's is ours of the same name with mergekit's defaults written out (normalize and rescale
  differ by method), except `linear`, which is `average` over every listed model (the first one, or base_model,
  is θ0 and also an input with its own weight, so Σ wi θi / Σ wi holds per tensor, gradients included);
- parameters: scalars, gradients and `filter:` conditionals, at every scope (a slice's source, a model, a slice,
  the config), resolved per tensor by merging/parameters.py as mergekit resolves them;
- `slices:` whose sources share each slice's layer range are an ordinary merge with settings by layer range
  (merging/mergekit_slices.py); `passthrough` slices stack layers;
- `int8_mask` is accepted and dropped: it only changes the dtype of mergekit's sign mask, never the result.
What mergekit does that we do not is refused by name, in one line.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from merging.errors import ConfigError
from merging.mergekit_slices import (
    Inputs,
    Source,
    StackedSlice,
    known_fields,
    mapping,
    model_name,
    read_slices,
    stacked_slices,
)
from merging.model_refs import ModelResolver, ResolvedModel

log = logging.getLogger("mergeplan")

GTA_DEFAULTS: dict[str, dict[str, bool]] = {  # mergekit's normalize / rescale defaults of its task-vector methods
    "task_arithmetic": {"normalize": False},
    "ties": {"normalize": True, "rescale": False},
    "dare_linear": {"normalize": False, "rescale": True},
    "dare_ties": {"normalize": False, "rescale": True},
    "breadcrumbs": {"normalize": False, "rescale": False},
    "breadcrumbs_ties": {"normalize": False, "rescale": False},
    "della": {"normalize": True, "rescale": True},
    "della_linear": {"normalize": False, "rescale": True},
}
SPARSIFIED = {"ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}
# the parameters mergekit's spec of each method declares (beyond the GTA family's, below)
OTHER_PARAMETERS: dict[str, set[str]] = {
    "linear": {"weight", "normalize"},
    "model_stock": {"filter_wise"},
    "slerp": {"t"},
    "passthrough": {"scale"},
}
GTA_PARAMETERS = {"int8_mask", "normalize", "rescale", "lambda", "weight", "density"}
DROPPED = {"int8_mask"}  # accepted, no effect on the result
BASE_OPTIONAL = {"nuslerp", "multislerp", "karcher"}  # mergekit merges the models themselves without base_model
TOP_LEVEL = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
             "tokenizer", "name", "model_name", "chat_template", "modules"}
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def is_mergekit(data: Any) -> bool:
    return isinstance(data, dict) and "merge_method" in data


def method_parameters(method: str, group_parameters: dict[str, set[str]]) -> set[str]:
    """The parameter names mergekit's METHOD takes."""
    if method in GTA_DEFAULTS:
        extra = {"gamma"} if method.startswith("breadcrumbs") else {"epsilon"} if method.startswith("della") else set()
        return GTA_PARAMETERS | extra
    if method in OTHER_PARAMETERS:
        return OTHER_PARAMETERS[method]
    return group_parameters[method]


def _tokenizer(data: dict, base: ResolvedModel, base_name: str | None, source: str) -> None:
    choice = data.get("tokenizer_source")
    if isinstance(data.get("tokenizer"), dict):
        choice = data["tokenizer"].get("source", choice)
    if choice not in (None, "base", base_name, str(base.path)):
        raise ConfigError(f"{source}: tokenizer_source: {choice!r} needs mergekit's vocabulary permutation, which "
                          "mergeplan does not do; the merged model takes the base's tokenizer (tokenizer_source: "
                          "base), so merge models that share it")
    if data.get("chat_template") is not None:
        raise ConfigError(f"{source}: chat_template: not supported; the merged model keeps the base's tokenizer "
                          "files and chat template (remove the field, or edit tokenizer_config.json afterwards)")


def _dtype(data: dict, source: str) -> str | None:
    out = data.get("out_dtype", data.get("dtype"))
    if out is None:
        return None
    if out not in DTYPES:
        raise ConfigError(f"{source}: {'out_dtype' if 'out_dtype' in data else 'dtype'}: {out!r}; choose one of "
                          f"{', '.join(DTYPES)}")
    if DTYPES.get(data.get("dtype", "float32"), "float32") != "float32":
        log.warning("%s: dtype %s: mergeplan computes in float32 and writes %s (mergekit computes in dtype)",
                    source, data["dtype"], DTYPES[out])
    return DTYPES[out]


def _models_form(data: dict, allowed: set[str], source: str) -> Inputs:
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{source}: models: expected a list of {{model: PATH, parameters: {{...}}}}")
    names, own = [], []
    for i, entry in enumerate(models):
        name = model_name(entry, f"models[{i}]", source)
        known_fields(entry, {"model", "parameters"}, f"models[{i}].", source, "not a field of a model entry")
        parameters = mapping(entry.get("parameters"), f"models[{i}].parameters", source)
        known_fields(parameters, allowed, f"models[{i}].parameters.", source, f"{data['merge_method']} takes no such "
               "parameter")
        names.append(name)
        own.append(parameters)
    return Inputs(names, own, data.get("base_model"))


def _method_params(method: str, parameters: dict, source: str) -> dict[str, Any]:
    """The config's own parameters with mergekit's defaults where ours differ, and the dropped ones removed."""
    for name in sorted(DROPPED & set(parameters)):
        log.info("%s: parameters.%s: accepted; it changes the dtype of mergekit's sign mask, not the result",
                 source, name)
    params = {k: v for k, v in parameters.items() if k not in DROPPED}
    for key, value in GTA_DEFAULTS.get(method, {}).items():
        params.setdefault(key, value)
    if method in SPARSIFIED:
        params.setdefault("density", 1.0)  # mergekit's default: nothing trimmed
    if method in RANDOM:
        log.warning("%s: %s: its random masks are mergeplan's own (seeded per tensor and expert), so the output "
                    "is another draw of the same method than mergekit's, and mergekit's rescale matches the L1 "
                    "norm where ours divides by the keep probability", source, method)
    if method == "task_arithmetic" and "density" in params:
        log.warning("%s: parameters.density: task_arithmetic trims nothing (mergekit ignores it too)", source)
        del params["density"]
    return params


def from_mergekit(data: dict, source: str, model_dir: Path | None = None,
                  group_parameters: dict[str, set[str]] | None = None) -> dict[str, Any]:
    """The fields of a MergeConfig for mergekit config DATA (read from the file SOURCE), every model resolved to a
    folder on this machine (hub ids in MODEL_DIR or the Hugging Face cache). GROUP_PARAMETERS: the parameter names
    of the methods that are not folds, by name."""
    from merging.methods import GROUP_METHODS, GROUP_PARAMETERS, METHODS  # the methods sit above the config

    group_parameters = GROUP_PARAMETERS if group_parameters is None else group_parameters
    known_fields(data, TOP_LEVEL, "", source, "not a field of a mergekit config")
    if "modules" in data:
        raise ConfigError(f"{source}: modules: per-module merges (vision towers, multi-module models) are not "
                          "supported; give models: or slices: for a language model")
    method = data["merge_method"]
    if method not in {*METHODS, *GROUP_METHODS, "linear", "passthrough"}:
        raise ConfigError(f"{source}: merge_method: unknown mergekit method {method!r}; mergeplan reads "
                          f"{', '.join(sorted({*METHODS, *GROUP_METHODS, 'linear', 'passthrough'} - {'average'}))}")
    allowed = method_parameters(method, group_parameters)
    parameters = mapping(data.get("parameters"), "parameters", source)
    known_fields(parameters, allowed, "parameters.", source, f"{method} takes no such parameter")
    if (data.get("models") is None) == (data.get("slices") is None):
        raise ConfigError(f"{source}: models: give exactly one of models: and slices:")
    resolver = ModelResolver(Path(source).parent, model_dir)
    if method == "passthrough":
        return _passthrough(data, parameters, allowed, resolver, source)
    if data.get("slices") is not None:
        inputs, slices, stack = read_slices(data, allowed, source)
    else:
        inputs, slices, stack = _models_form(data, allowed, source), [], None
    if stack is not None:
        raise ConfigError(f"{source}: slices: sources of different layer ranges are only stacked by passthrough; "
                          f"{method} merges the same layers of each model (give every source of a slice one range)")
    return _merge_fields(data, method, inputs, slices, parameters, resolver, source)


def _resolved(inputs: Inputs, resolver: ModelResolver, field: str,
              source: str) -> tuple[list[ResolvedModel], ResolvedModel | None]:
    """The inputs' models and the base as folders (and LoRA adapters) on this machine."""
    models = [resolver.resolve(name, f"{source}: {field}[{i}].model") for i, name in enumerate(inputs.names)]
    base = resolver.resolve(inputs.base, f"{source}: base_model") if inputs.base is not None else None
    if base is not None and base.lora is not None:
        raise ConfigError(f"{source}: base_model: {inputs.base!r} applies a LoRA to the base; merge the "
                          "adapter into the base first, or name the fine-tuned model as an expert")
    return models, base


def _merge_fields(data: dict, method: str, inputs: Inputs, slices: list, parameters: dict,
                  resolver: ModelResolver, source: str) -> dict[str, Any]:
    models, base = _resolved(inputs, resolver, "slices[0].sources" if slices else "models", source)
    with_base = base is not None
    if method == "linear":
        if base is not None and base not in models:
            raise ConfigError(f"{source}: base_model: linear averages the listed models; list {base} under models "
                              "with its weight (or remove base_model)")
        base, experts = base or models[0], list(range(len(models)))
        ours = "average" if parameters.pop("normalize", True) else _linear_sum(inputs, parameters, source)
    else:
        ours = method
        if base is None and method in BASE_OPTIONAL:
            base, experts = models[0], list(range(len(models)))
            parameters["with_base"] = False
        elif base is None:
            raise ConfigError(f"{source}: base_model: required by {method}; name the model the experts were tuned "
                              "from")
        else:
            experts = [i for i, model in enumerate(models) if model != base]
            if method in BASE_OPTIONAL:
                parameters["with_base"] = with_base
    if not experts:
        raise ConfigError(f"{source}: models: every listed model is the base; list the experts to merge")
    _tokenizer(data, base, inputs.base, source)
    params = _method_params(method, parameters, source) if ours != "average" else parameters
    _drop_weights(ours, params, inputs, slices, source)
    return {"base": base.path, "method": ours, "dtype": _dtype(data, source), "params": params,
            "experts": [{"path": models[i].path, "lora": models[i].lora, "name": models[i].name,
                         "params": inputs.own[i]} for i in experts],
            "slices": [piece.model_copy(update={"experts": [piece.experts[i] for i in experts]})
                       if piece.experts else piece for piece in slices]}


def _drop_weights(method: str, params: dict, inputs: Inputs, slices: list, source: str) -> None:
    """Methods without per-model weights: mergekit ignores the weights a config gives them, and so do we."""
    from merging.methods import method_class

    if method_class(method, source).takes_weights:
        return
    scopes = [params, *inputs.own, *(piece.params for piece in slices),
              *(own for piece in slices for own in piece.experts)]
    if any(scope.pop("weight", None) is not None for scope in scopes):
        log.warning("%s: %s: mergekit ignores the models' weights; so does mergeplan", source, method)


def _linear_sum(inputs: Inputs, parameters: dict, source: str) -> str:
    """linear with normalize: false is Σ wi θi: a task-vector merge only when the weights sum to 1."""
    weights = [own.get("weight", parameters.get("weight", 1.0)) for own in inputs.own]
    if any(not isinstance(w, int | float) or isinstance(w, bool) for w in weights):
        raise ConfigError(f"{source}: parameters.normalize: false with per-layer or missing weights scales the "
                          "base too; give every model one number summing to 1, or set normalize: true")
    if abs(sum(weights) - 1) > 1e-9:
        raise ConfigError(f"{source}: parameters.normalize: false with weights summing to {sum(weights):g} scales "
                          "the base too; not a task-vector merge (set normalize: true or weights summing to 1)")
    return "average"


def _passthrough(data: dict, parameters: dict, allowed: set[str], resolver: ModelResolver,
                 source: str) -> dict[str, Any]:
    """passthrough: one model per slice, its layers stacked in order (or one model under models:, copied)."""
    if data.get("slices") is not None:
        pieces = stacked_slices(data, allowed, source)
    else:
        inputs = _models_form(data, allowed, source)
        if len(inputs.names) != 1:
            raise ConfigError(f"{source}: models: passthrough copies one model; got {len(inputs.names)} (stack "
                              "layers of several with slices:, one source each)")
        pieces = [StackedSlice(Source(inputs.names[0], None, inputs.own[0]), {})]
    models: list[ResolvedModel] = []
    ranges = []
    for r, piece in enumerate(pieces):
        model = resolver.resolve(piece.source.model, f"{source}: slices[{r}].sources[0].model")
        if model not in models:
            models.append(model)
        scopes = [piece.source.params, piece.params, parameters]
        scale = next((scope["scale"] for scope in scopes if "scale" in scope), None)
        ranges.append({"expert": models.index(model), "layers": piece.source.layers,
                       "params": {} if scale is None else {"scale": scale}})
    _tokenizer(data, models[0], data.get("base_model"), source)
    return {"base": models[0].path, "method": "passthrough", "dtype": _dtype(data, source), "stack": ranges,
            "experts": [{"path": m.path, "lora": m.lora, "name": m.name} for m in models]}
