"""Layer stacking (mergekit's `passthrough` over slices, the "frankenmerge"): the output's layers are ranges of
layers of other models, one after another, each tensor copied (times an optional `scale`), never averaged.

The embeddings and other tensors before the layers come from the first slice's model, the final norm and output
head from the last slice's; output layer j is layer start + offset of its slice's model, renamed. The output
config is the first model's with the layer count (and any per-layer list, e.g. layer_types) of the stack.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from merging.config import MergeConfig
from merging.errors import CheckpointError, ConfigError
from merging.experts import open_expert
from merging.io.checkpoint import CheckpointReader, CheckpointWriter, parse_size
from merging.parameters import AFTER_LAYERS, LAYER, StackedRange, check_setting, evaluate, layer_count

log = logging.getLogger("mergeplan")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _renamed(name: str, layer: int) -> str:
    match = LAYER.search(name)
    return name[:match.start(1)] + str(layer) + name[match.end(1):]


class Stack:
    """The output tensors of a stack, each with where it comes from: (output name, source index, source name, t)."""

    def __init__(self, ranges: list[StackedRange], readers: list[CheckpointReader], source: str):
        self.ranges, self.readers, self.source = ranges, readers, source
        first, last = readers[ranges[0].expert], readers[ranges[-1].expert]
        outside = [n for n in first.names() if not LAYER.search(n)]
        self.entries: list[tuple[str, int, str, float]] = [(n, 0, n, 0.0) for n in outside if not AFTER_LAYERS.match(n)]
        layer = 0
        for r, piece in enumerate(ranges):
            reader = readers[piece.expert]
            count = layer_count(reader.names())
            start, end = piece.layers or (0, count)
            if end > count:
                raise ConfigError(f"{source}: slices[{r}].sources[0].layer_range: [{start}, {end}] is out of bounds: "
                                  f"{reader.folder} has {count} layers")
            by_layer: dict[int, list[str]] = {}
            for name in reader.names():
                if (match := LAYER.search(name)) and start <= int(match.group(1)) < end:
                    by_layer.setdefault(int(match.group(1)), []).append(name)
            for offset, index in enumerate(range(start, end)):
                t = offset / (end - start - 1) if end - start > 1 else 1.0
                self.entries += [(_renamed(n, layer), r, n, t) for n in by_layer.get(index, [])]
                layer += 1
        self.entries += [(n, len(ranges) - 1, n, 0.0) for n in last.names() if not LAYER.search(n)
                         and AFTER_LAYERS.match(n)]
        self.layers = layer
        self._check_shapes(first)

    def _check_shapes(self, first: CheckpointReader) -> None:
        template = {LAYER.sub(".layers.#.", n): first.tensors[n].shape for n in first.names() if LAYER.search(n)}
        for _, r, name, _ in self.entries:
            shape = self.readers[self.ranges[r].expert].tensors[name].shape
            expected = template.get(LAYER.sub(".layers.#.", name), shape) if LAYER.search(name) else shape
            if shape != expected:
                raise CheckpointError(f"{self.readers[self.ranges[r].expert].folder}: tensor {name} is {tuple(shape)}, "
                                      f"not {tuple(expected)} as in {first.folder}; stacked models must share the "
                                      "architecture of their layers")


def stacked_config(model_config: dict, ranges: list[tuple[int, int]], layers: int, dtype: str | None) -> dict:
    """MODEL_CONFIG with LAYERS layers: per-layer lists (as long as the model's layers) cut along the ranges."""
    count = model_config.get("num_hidden_layers")
    config = dict(model_config)
    for key, value in model_config.items():
        if isinstance(value, list) and count and len(value) == count:
            config[key] = [value[i] for start, end in ranges for i in range(start, end)]
    config["num_hidden_layers"] = layers
    if dtype:
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
    return config


def stack_layers(config: MergeConfig, out: Path, overwrite: bool, source: str) -> Path:
    """Write the stack that CONFIG (method passthrough, its `stack` of layer ranges of experts) describes into
    OUT."""
    from merging.merger import refuse_output_over_inputs, write_recipe  # the merge core writes the recipe

    refuse_output_over_inputs(config, out, source)
    experts = [open_expert(e.path, e.lora) for e in config.experts]
    readers = [CheckpointReader(e.path) for e in config.experts]
    ranges = config.stack
    stack = Stack(ranges, readers, source)
    for r, piece in enumerate(ranges):
        unknown = sorted(set(piece.params) - {"scale"})
        if unknown:
            raise ConfigError(f"{source}: slices[{r}].sources[0].parameters.{unknown[0]}: passthrough takes no such "
                              "parameter (it takes scale)")
        if "scale" in piece.params:
            check_setting(piece.params["scale"], f"{source}: slices[{r}].sources[0].parameters.scale", stack.layers)
    dtype = DTYPES[config.dtype] if config.dtype else None
    layout = [(out_name, dtype or readers[ranges[r].expert].tensors[name].dtype,
               readers[ranges[r].expert].tensors[name].shape) for out_name, r, name, _ in stack.entries]
    first = readers[ranges[0].expert]
    with CheckpointWriter(out, layout, max_shard_size=parse_size(config.max_shard_size), overwrite=overwrite) as writer:
        for out_name, r, name, t in stack.entries:
            piece = ranges[r]
            tensor = experts[piece.expert].weights(name, readers[piece.expert])
            value = evaluate(piece.params["scale"], name, t) if "scale" in piece.params else None
            if value is not None and value != 1:
                tensor = (tensor.float() * value).to(tensor.dtype)
            writer.write(out_name, tensor.to(dtype) if dtype else tensor)
        writer.copy_companions(first.folder)
        model_ranges = [piece.layers or (0, layer_count(readers[piece.expert].names())) for piece in ranges]
        writer.write_json("config.json", stacked_config(first.config, model_ranges, stack.layers, config.dtype))
        write_recipe(config, writer)
    log.info("stacked %d layers from %d slices into %s", stack.layers, len(ranges), out)
    return out
