"""mergekit YAML files read as merge configs, for the methods both tools have.

The mapping is exact maths where mergekit's method is one of ours (see the spec of our methods), and a notice
(a logged warning, one line) where the two differ in a way a user would not guess; what cannot be mapped is
refused by name. mergekit's semantics taken here (0.1.x): `linear` is Σ wi θi / Σ wi over every listed model
(normalize defaults to true); the task-vector methods skip the base when it is listed among the models;
`task_arithmetic`, `dare_linear` and `dare_ties` default to normalize: false, `ties` to true; `lambda` scales
the merged task vector (default 1); `dtype` is mergekit's compute dtype and `out_dtype` the output's.
"""

from __future__ import annotations

import logging
from typing import Any

from merging.errors import ConfigError

log = logging.getLogger("mergeplan")

# mergekit's name -> ours, and its default for normalize (None: the method has no normalize)
SHARED_METHODS: dict[str, tuple[str, bool | None]] = {
    "linear": ("task_arithmetic", True),
    "task_arithmetic": ("task_arithmetic", False),
    "ties": ("ties", True),
    "dare_linear": ("dare_linear", False),
    "dare_ties": ("dare_ties", False),
    "breadcrumbs": ("breadcrumbs", False),
    "breadcrumbs_ties": ("breadcrumbs_ties", False),
    "della": ("della", True),
    "della_linear": ("della_linear", False),
    "model_stock": ("model_stock", None),
    "slerp": ("slerp", None),
}
# ours that take the elected entries' weighted mean, where mergekit with normalize: false sums them
DISJOINT_MEAN = ("ties", "dare_ties", "breadcrumbs_ties", "della")
# the sparsified methods: the one-value parameters each reads, and mergekit's default for rescale
SPARSIFIED: dict[str, tuple[tuple[str, ...], bool]] = {
    "ties": (("density",), False), "dare_linear": (("density",), True), "dare_ties": (("density",), True),
    "breadcrumbs": (("density", "gamma"), False), "breadcrumbs_ties": (("density", "gamma"), False),
    "della": (("density", "epsilon"), True), "della_linear": (("density", "epsilon"), True),
}
UNSUPPORTED_METHODS = ("nuslerp", "multislerp", "passthrough", "sce", "karcher", "nearswap", "arcee_fusion", "ram")
TOP_LEVEL = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
             "tokenizer", "name", "model_name"}
MODEL_FIELDS = {"model", "parameters"}
MODEL_PARAMETERS = {"weight", "density", "gamma", "epsilon"}
GLOBAL_PARAMETERS = {"normalize", "lambda", "rescale", "int8_mask", "density", "weight", "gamma", "epsilon", "t",
                     "filter_wise"}
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def is_mergekit(data: Any) -> bool:
    return isinstance(data, dict) and "merge_method" in data


def _scalar(value: Any, field: str, source: str) -> Any:
    """A parameter given as one value; gradients (lists) and tensor-name filters are mergekit-only."""
    if isinstance(value, list | dict):
        raise ConfigError(f"{source}: {field}: per-layer gradients and tensor-name filters are not supported; "
                          "give one number")
    return value


def _number(value: Any, field: str, source: str) -> float:
    value = _scalar(value, field, source)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{source}: {field}: expected a number, got {value!r}")
    return float(value)


def _known(fields: dict, allowed: set[str], where: str, source: str) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ConfigError(f"{source}: {where}{unknown[0]}: not a field mergeplan reads from a mergekit config "
                          f"(it reads {', '.join(sorted(allowed))})")


def _model_path(entry: Any, index: int, source: str) -> str:
    model = entry.get("model") if isinstance(entry, dict) else None
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{source}: models[{index}].model: expected a checkpoint folder path")
    if "+" in model:
        raise ConfigError(f"{source}: models[{index}].model: {model!r} applies a LoRA to a model (mergekit's "
                          "MODEL+LORA); give the PEFT adapter folder itself as the expert")
    return model


def _tokenizer(data: dict, base: str, source: str) -> None:
    choice = data.get("tokenizer_source")
    if isinstance(data.get("tokenizer"), dict):
        choice = data["tokenizer"].get("source", choice)
    if choice not in (None, "base", base):
        raise ConfigError(f"{source}: tokenizer_source: {choice!r} is not supported; the merged model takes the "
                          "base's tokenizer (tokenizer_source: base)")


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


def _one_value(models: list[dict], parameters: dict, field: str, source: str) -> float | None:
    """One value of a per-model parameter for all experts (mergeplan's methods take a single one); None when
    it is not given, so that our default applies."""
    found = {i: _number(m["parameters"][field], f"models[{i}].parameters.{field}", source)
             for i, m in enumerate(models) if field in (m.get("parameters") or {})}
    values = set(found.values()) | ({_number(parameters[field], f"parameters.{field}", source)}
                                    if field in parameters and len(found) < len(models) else set())
    if len(values) > 1:
        raise ConfigError(f"{source}: models[].parameters.{field}: the models have different values "
                          f"({', '.join(f'{v:g}' for v in sorted(values))}); mergeplan takes one for all experts")
    return values.pop() if values else None


def _sparsified_params(method: str, ours: str, models: list[dict], parameters: dict, source: str) -> dict:
    fields, rescale_default = SPARSIFIED[ours]
    params = {}
    for field in fields:
        value = _one_value(models, parameters, field, source)
        if value is None and field == "density":
            raise ConfigError(f"{source}: parameters.density: required by {method}; give it once for all models")
        if value is not None:
            params[field] = value
    rescale = parameters.get("rescale", rescale_default)
    if rescale and not rescale_default:
        raise ConfigError(f"{source}: parameters.rescale: true is not supported for {method}; mergeplan keeps the "
                          "trimmed entries as they are (rescale: false)")
    if rescale_default and not rescale:
        raise ConfigError(f"{source}: parameters.rescale: false is not supported; {method} keeps the expected "
                          "task vector by dividing each kept entry by its keep probability")
    if rescale_default:
        log.warning("%s: %s: mergeplan divides each kept entry by its keep probability (1/density for DARE, as the "
                    "paper does) with its own seeded masks; mergekit's masks and L1 rescaling differ, so the "
                    "outputs do not match", source, method)
    return params


def from_mergekit(data: dict, source: str) -> dict[str, Any]:
    """The fields of a MergeConfig for mergekit config DATA (read from SOURCE); paths as written in it."""
    if "slices" in data:
        raise ConfigError(f"{source}: slices: layer slices are not supported; list whole models under models:")
    _known(data, TOP_LEVEL, "", source)
    method = data["merge_method"]
    if method in UNSUPPORTED_METHODS:
        raise ConfigError(f"{source}: merge_method: {method!r} is not supported yet; mergeplan reads "
                          f"{', '.join(SHARED_METHODS)} from mergekit configs")
    if method not in SHARED_METHODS:
        raise ConfigError(f"{source}: merge_method: unknown mergekit method {method!r}; mergeplan reads "
                          f"{', '.join(SHARED_METHODS)}")
    ours, normalize_default = SHARED_METHODS[method]
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{source}: models: expected a list of {{model: PATH, parameters: {{...}}}}")
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ConfigError(f"{source}: parameters: expected a mapping")
    _known(parameters, GLOBAL_PARAMETERS, "parameters.", source)
    paths = [_model_path(entry, i, source) for i, entry in enumerate(models)]
    for i, entry in enumerate(models):
        _known(entry, MODEL_FIELDS, f"models[{i}].", source)
        _known(entry.get("parameters") or {}, MODEL_PARAMETERS, f"models[{i}].parameters.", source)
    base = data.get("base_model")
    if base is None and method != "linear":
        raise ConfigError(f"{source}: base_model: required by {method}; name the model the experts were tuned from")
    if method == "slerp" and (len(paths) != 2 or base not in paths):
        raise ConfigError(f"{source}: models: slerp takes exactly two models, one of them the base_model; "
                          f"got {len(paths)}")
    base = base if base is not None else paths[0]  # linear: any listed model serves as θ0
    _tokenizer(data, base, source)
    default_weight = _number(parameters.get("weight", 1.0), "parameters.weight", source)
    weights = [_number((m.get("parameters") or {}).get("weight", default_weight), f"models[{i}].parameters.weight",
                       source) for i, m in enumerate(models)]
    experts = [(path, weight) for path, weight in zip(paths, weights, strict=True) if path != base]
    if not experts:
        raise ConfigError(f"{source}: models: every listed model is the base; list the experts to merge")
    return {"base": base, "method": ours, "dtype": _dtype(data, source),
            "params": _params(method, ours, normalize_default, models, parameters, weights, source),
            "experts": [{"path": path, "weight": weight} for path, weight in _expert_weights(method, experts, weights,
                                                                                            parameters, source)]}


def _expert_weights(method: str, experts: list[tuple[str, float]], weights: list[float], parameters: dict,
                    source: str) -> list[tuple[str, float]]:
    if method != "linear":
        return experts
    total = sum(weights)  # the base's own weight, when listed, counts in the divisor
    normalize = parameters.get("normalize", True)
    if not normalize and abs(total - 1) > 1e-9:
        raise ConfigError(f"{source}: parameters.normalize: false with weights summing to {total:g} scales the "
                          "base too; not a task-vector merge (set normalize: true or weights summing to 1)")
    return [(path, weight / total) for path, weight in experts]


def _params(method: str, ours: str, normalize_default: bool | None, models: list[dict], parameters: dict,
            weights: list[float], source: str) -> dict[str, Any]:
    if ours == "slerp":
        if "t" not in parameters:
            raise ConfigError(f"{source}: parameters.t: required by slerp (0 is the base_model, 1 the other model)")
        return {"t": _number(parameters["t"], "parameters.t", source)}
    if ours == "model_stock":
        if any(w != 1 for w in weights):
            log.warning("%s: model_stock: mergekit ignores the models' weights; so does mergeplan", source)
        filter_wise = _scalar(parameters.get("filter_wise", False), "parameters.filter_wise", source)
        return {"filter_wise": filter_wise}
    normalize = _scalar(parameters.get("normalize", normalize_default), "parameters.normalize", source)
    if not isinstance(normalize, bool):
        raise ConfigError(f"{source}: parameters.normalize: expected true or false, got {normalize!r}")
    params: dict[str, Any] = {"lambda": _number(parameters.get("lambda", 1.0), "parameters.lambda", source)}
    if ours in DISJOINT_MEAN:
        if not normalize:
            log.warning("%s: parameters.normalize: false makes mergekit's %s sum the elected entries; mergeplan "
                        "takes their weighted mean (normalize: true)", source, method)
    elif method != "linear":
        params["normalize"] = normalize
    if ours in SPARSIFIED:
        params |= _sparsified_params(method, ours, models, parameters, source)
    return params
