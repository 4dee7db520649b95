"""The per-tensor merge loop: read ahead on a thread, fold experts in float32, write each tensor at once.

Memory stays per tensor: the base tensor, the method's accumulators, and at most `READ_AHEAD` raw tensors
(or LoRA factors) read ahead; a written tensor is on disk, not in a shard buffer.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from merging.experts import Expert, require_finite
from merging.io.checkpoint import CheckpointReader, CheckpointWriter
from merging.methods import MergeMethod
from merging.progress_bar import progress_bar

log = logging.getLogger("mergeplan")
READ_AHEAD = 2


@dataclass(frozen=True)
class WeightedExpert:
    expert: Expert
    weight: float
    index: int  # position in the merge, fixed for the merge's lifetime: DARE seeds depend on it


def state_key(accumulator: str, tensor_name: str) -> str:
    return f"{accumulator}:{tensor_name}"


def read_ahead(jobs: Iterable[Callable[[], torch.Tensor]], depth: int = READ_AHEAD) -> Iterator[torch.Tensor]:
    """Run zero-argument read jobs on one background thread, `depth` ahead, yielding results in order."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergeplan-read") as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(job))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def output_dtype(stored: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    return requested if requested is not None and stored.is_floating_point else stored


class Scratch:
    """Buffers reused from tensor to tensor, grown to the largest: a fresh multi-megabyte allocation costs a
    page fault per 4 KiB, about as much as the arithmetic done on it."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, key: str, shape: torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get((key, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[(key, dtype)] = torch.empty(numel, dtype=dtype)
        return buffer[:numel].view(shape)


def stream_merge(base: CheckpointReader, experts: list[WeightedExpert], method: MergeMethod,
                 merged_names: set[str], total_weight: float, writer: CheckpointWriter,
                 dtype: torch.dtype | None = None, state_in: CheckpointReader | None = None,
                 state_out: CheckpointWriter | None = None) -> None:
    """Merge every tensor of `base` into `writer`; tensors outside `merged_names` are copied from the base.

    With `state_in`, the method's accumulators start from a saved state instead of zeros (incremental
    merge); with `state_out`, the accumulators after folding `experts` are saved.
    """
    names = base.names()

    def jobs() -> Iterator[Callable[[], object]]:
        for name in names:
            yield lambda name=name: base.read(name)
            if name in merged_names:
                if state_in is not None:
                    for key in method.state_names:
                        yield lambda key=key, name=name: state_in.read(state_key(key, name))
                for expert in experts:
                    yield lambda source=expert.expert, name=name: source.load(name)

    tensors = read_ahead(jobs())
    scratch = Scratch()
    for name in progress_bar(names, "merge", "tensor"):
        stored = next(tensors)
        target = output_dtype(stored.dtype, dtype)
        if name not in merged_names:
            writer.write(name, stored.to(target))
            continue
        base_tensor = scratch.take("base", stored.shape).copy_(stored)
        require_finite(base_tensor, base.folder, name)
        if state_in is not None:
            state = {key: next(tensors) for key in method.state_names}
        else:
            state = {key: scratch.take(key, method.state_shape(key, stored.shape)).zero_()
                     for key in method.state_names}
        delta = scratch.take("delta", stored.shape)
        for expert in experts:
            vector = expert.expert.task_vector(name, next(tensors), base_tensor, delta)
            if vector is not None:  # a zero task vector adds nothing to any method's accumulators
                method.add(state, method.sparsify(vector, name, expert.index), expert.weight)
        if state_out is not None:
            for key, value in state.items():
                state_out.write(state_key(key, name), value)
        merged = base_tensor.add_(method.delta(state, total_weight, base_tensor))
        if target != torch.float32:
            merged = scratch.take("out", merged.shape, target).copy_(merged)
        writer.write(name, merged)
