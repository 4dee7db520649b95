"""The per-tensor merge loop, in float32, on the CPU or a device.

Tensors whose method folds entry by entry (task arithmetic, average, TIES with its magnitude trim) over
full-checkpoint experts are merged in blocks of BLOCK_ENTRIES entries, one tensor per worker thread (WORKERS):
a block of the base, of each expert and of every accumulator is read with pread into reused buffers, folded while
it is in the CPU cache, and written at its offset. No whole-tensor float32 copy exists and memory does not grow
with the number of experts. A magnitude trim keeps the k largest |τ| of the WHOLE task vector: two histogram
sweeps over the blocks (a radix select on the float bits) find the k-th largest and how many entries equal to it
are kept, then the folding sweep keeps exactly the entries sparsify.top_magnitude_mask keeps.

Every other tensor (methods that need all inputs at once, random drops, LoRA experts, ...) is merged whole: read
ahead on a thread (at most READ_AHEAD raw tensors or LoRA factors), folded, written at once.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from merging.errors import ConfigError
from merging.experts import EXACT_IN_FLOAT32, Expert, FullCheckpoint, require_finite
from merging.io.checkpoint import CheckpointReader, CheckpointWriter, RangeReader
from merging.io.safetensors_file import TensorInfo
from merging.methods.average import Average
from merging.methods.base import MergeMethod, WeightedSum
from merging.methods.group import GroupMethod
from merging.methods.model_stock import ModelStock
from merging.methods.slerp import Slerp
from merging.methods.task_arithmetic import TaskArithmetic
from merging.methods.ties import Ties
from merging.progress_bar import progress_bar
from merging.tensor_plan import FixedMethod, TensorMerge, TensorPlan

log = logging.getLogger("mergeplan")
READ_AHEAD = 2
BLOCK_ENTRIES = 1 << 18  # 1 MiB per float32 block: TIES' block buffers (~10 MiB) stay in the CPU's caches
DEVICE_BLOCK_ENTRIES = 1 << 24  # on a GPU, fewer and bigger blocks amortise kernel launches and transfers
WORKERS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
Methods = TensorPlan | FixedMethod
# folds whose add and delta work entry by entry, so a block of rows of every accumulator folds like the whole
ELEMENTWISE_ADD = {WeightedSum.add, Ties.add}
ELEMENTWISE_DELTA = {TaskArithmetic.delta, Average.delta, Ties.delta}
# folds whose whole-tensor arithmetic creates no CPU tensor, so it can run on a device
DEVICE_ADD = ELEMENTWISE_ADD | {ModelStock.add}
DEVICE_DELTA = ELEMENTWISE_DELTA | {Slerp.delta, ModelStock.delta}
HIGH_BINS, LOW_BINS = 1 << 15, 1 << 16  # |τ|'s float32 bits: the top 16 (sign 0), then the low 16


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


def resolve_device(name: str | None, source: str = "config") -> torch.device:
    """The device a merge's arithmetic runs on: the CPU unless NAME is cuda or cuda:N (a one-line error when
    that device does not exist here)."""
    if name is None:
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{source}: device: {name!r} is not a device mergeplan merges on; use cpu or cuda (cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{source}: device: {name}: no CUDA device is available on this machine; leave device "
                              "unset (or --device cpu) to merge on the CPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{source}: device: {name}: this machine has {torch.cuda.device_count()} CUDA "
                              "device(s)")
    return device


class Scratch:
    """Buffers reused from tensor to tensor, grown to the largest: a fresh multi-megabyte allocation costs a
    page fault per 4 KiB, about as much as the arithmetic done on it."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, key: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get((key, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[(key, dtype)] = torch.empty(numel, dtype=dtype, device=self.device)
        return buffer[:numel].view(shape)


def _select(counts: torch.Tensor, want: int) -> tuple[int, int]:
    """The bin of a histogram holding its want-th largest entry, and the number of entries in the bins above."""
    at_or_above = counts.flip(0).cumsum(0).flip(0)
    index = int((at_or_above >= want).sum()) - 1
    return index, int(at_or_above[index + 1]) if index + 1 < len(counts) else 0


class Trim:
    """sparsify.magnitude_trim_ (without rescale) of one expert's task vector on one tensor, applied block by block.

    Two sweeps over the blocks find the float32 bits `threshold` of the keep-th largest |τ|: the entries above it
    are kept, and of those equal to it the first `ties` in index order, as a stable descending sort keeps them."""

    def __init__(self, keep: int, device: torch.device):
        self.keep, self.counts = keep, torch.zeros(HIGH_BINS, dtype=torch.int64, device=device)
        self.bucket = self.above = self.threshold = self.ties = self.seen = 0

    def count_high(self, bits: torch.Tensor, scratch: Scratch) -> None:
        high = torch.bitwise_right_shift(bits, 16, out=scratch.take("high", bits.shape, torch.int32))
        self.counts += torch.bincount(high, minlength=HIGH_BINS)

    def choose_bucket(self) -> None:
        self.bucket, self.above = _select(self.counts, self.keep)
        self.counts = torch.zeros(LOW_BINS, dtype=torch.int64, device=self.counts.device)

    def count_low(self, bits: torch.Tensor, scratch: Scratch) -> None:
        # the bucket's entries to 1..LOW_BINS, the others to 0 or LOW_BINS + 1 (no boolean indexing: 2x faster)
        low = torch.sub(bits, (self.bucket << 16) - 1, out=scratch.take("high", bits.shape, torch.int32))
        self.counts += torch.bincount(low.clamp_(0, LOW_BINS + 1), minlength=LOW_BINS + 2)[1:LOW_BINS + 1]

    def choose_threshold(self) -> None:
        low, above_low = _select(self.counts, self.keep - self.above)
        self.threshold = self.bucket << 16 | low
        self.ties = self.keep - self.above - above_low

    def apply(self, delta: torch.Tensor, scratch: Scratch) -> torch.Tensor:
        # masks of 1.0 / 0.0: comparisons into float32 and a float product are 2x faster than with bool masks
        bits = torch.abs(delta, out=scratch.take("magnitude", delta.shape)).view(torch.int32)
        kept = torch.gt(bits, self.threshold, out=scratch.take("kept", delta.shape))
        if self.seen < self.ties:
            equal = torch.eq(bits, self.threshold, out=scratch.take("equal", delta.shape))
            count, room = int(torch.count_nonzero(equal)), self.ties - self.seen
            if count <= room:
                kept.add_(equal)
            else:
                kept[torch.nonzero(equal).squeeze(1)[:room]] = 1.0
            self.seen += count
        return delta.mul_(kept)  # the product magnitude_trim_ takes: a dropped negative entry becomes -0.0


def trim_keep(sparsifier: MergeMethod, numel: int) -> int | None:
    """How many entries sparsifier's magnitude trim keeps; None when it keeps all (as magnitude_trim_ decides)."""
    density = sparsifier.params.density
    if density >= 1 or numel == 0:
        return None
    keep = max(1, int(density * numel))
    return None if keep >= numel else keep


def blockwise(plan: TensorMerge, experts: list[WeightedExpert], name: str, shape: tuple[int, ...]) -> bool:
    """Whether tensor NAME merges block by block with the same result as whole: an entry-by-entry fold, sparsifiers
    that keep all or trim by magnitude without rescale, and full-checkpoint experts that float32 holds exactly."""
    method = plan.method
    if isinstance(method, GroupMethod) or math.prod(shape) == 0 or type(method).add not in ELEMENTWISE_ADD or \
            type(method).delta not in ELEMENTWISE_DELTA:
        return False
    if any(tuple(method.state_shape(key, torch.Size(shape))) != tuple(shape) for key in method.state_names):
        return False
    for expert in experts:
        sparsify = type(plan.sparsifiers[expert.index]).sparsify
        if sparsify is not MergeMethod.sparsify and (sparsify is not Ties.sparsify or
                                                     plan.sparsifiers[expert.index].params.rescale):
            return False
        if type(expert.expert) is not FullCheckpoint or \
                expert.expert.reader.tensors[name].dtype not in EXACT_IN_FLOAT32:
            return False
    return True


def on_device(plan: TensorMerge, experts: list[WeightedExpert]) -> bool:
    """Whether a tensor merged whole can fold on a device (no step of its method creates a CPU tensor)."""
    method = plan.method
    return not isinstance(method, GroupMethod) and type(method).add in DEVICE_ADD and \
        type(method).delta in DEVICE_DELTA and \
        all(type(plan.sparsifiers[e.index]).sparsify is MergeMethod.sparsify for e in experts)


def to_device(loaded: object, device: torch.device) -> object:
    """What an expert's load() returned (tensors, tuples of them, None), on DEVICE."""
    if isinstance(loaded, tuple):
        return tuple(to_device(item, device) for item in loaded)
    return loaded.to(device) if isinstance(loaded, torch.Tensor) else loaded


class BlockMerge:
    """Merges or copies whole tensors block by block; each call is one tensor, calls run on several threads."""

    def __init__(self, base: CheckpointReader, experts: list[WeightedExpert], tensors: Methods,
                 writer: CheckpointWriter, dtype: torch.dtype | None, state_in: CheckpointReader | None,
                 state_out: CheckpointWriter | None, device: torch.device, files: RangeReader):
        self.base, self.experts, self.tensors, self.writer, self.dtype = base, experts, tensors, writer, dtype
        self.state_in, self.state_out, self.device, self.files = state_in, state_out, device, files
        self.entries = BLOCK_ENTRIES if device.type == "cpu" else DEVICE_BLOCK_ENTRIES
        self._local = threading.local()

    def _scratch(self) -> tuple[Scratch, Scratch]:
        """This thread's buffers: on the device, and on the CPU (raw reads and the output)."""
        if not hasattr(self._local, "scratch"):
            self._local.scratch = (Scratch(self.device), Scratch())
        return self._local.scratch

    def _blocks(self, numel: int) -> list[tuple[int, int]]:
        return [(start, min(start + self.entries, numel)) for start in range(0, numel, self.entries)]

    def _read(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Entries start..stop of INFO in this thread's raw buffer: use them before the next read."""
        raw = self._scratch()[1].take("raw", ((stop - start) * info.dtype.itemsize,), torch.uint8)
        return self.files.read(info, start, stop, raw)

    def copy(self, name: str) -> None:
        info = self.base.tensors[name]
        target = output_dtype(info.dtype, self.dtype)
        host = self._scratch()[1]
        for start, stop in self._blocks(info.numel):
            raw = self._read(info, start, stop)
            self.writer.write_range(name, start, raw if target == info.dtype else
                                    host.take("out", raw.shape, target).copy_(raw))

    def _sweep(self, name: str, info: TensorInfo, trims: dict[int, Trim], count: Callable) -> None:
        """One pass over the blocks of every trimmed expert's task vector, COUNT(trim, bits of |τ|) per block."""
        scratch = self._scratch()[0]
        for start, stop in self._blocks(info.numel):
            base = scratch.take("base", (stop - start,)).copy_(self._read(info, start, stop))
            delta = scratch.take("delta", base.shape)
            for expert in self.experts:
                if expert.index in trims:
                    delta.copy_(self._read(expert.expert.reader.tensors[name], start, stop)).sub_(base)
                    bits = torch.abs(delta, out=scratch.take("magnitude", base.shape)).view(torch.int32)
                    count(trims[expert.index], bits, scratch)

    def merge(self, name: str) -> None:
        info, plan = self.base.tensors[name], self.tensors[name]
        method, target = plan.method, output_dtype(info.dtype, self.dtype)
        trims = {}
        for expert in self.experts:
            sparsifier = plan.sparsifiers[expert.index]
            if type(sparsifier).sparsify is Ties.sparsify and (keep := trim_keep(sparsifier, info.numel)):
                trims[expert.index] = Trim(keep, self.device)
        if trims:
            self._sweep(name, info, trims, Trim.count_high)
            for trim in trims.values():
                trim.choose_bucket()
            self._sweep(name, info, trims, Trim.count_low)
            for trim in trims.values():
                trim.choose_threshold()
        scratch, host = self._scratch()
        for start, stop in self._blocks(info.numel):
            shape = (stop - start,)
            base = scratch.take("base", shape).copy_(self._read(info, start, stop))
            require_finite(base, self.base.folder, name)
            state = {key: scratch.take(key, shape) for key in method.state_names}
            for key, accumulator in state.items():
                if self.state_in is not None:
                    accumulator.copy_(self._read(self.state_in.tensors[state_key(key, name)], start, stop))
                else:
                    accumulator.zero_()
            delta = scratch.take("delta", shape)
            for expert in self.experts:
                delta.copy_(self._read(expert.expert.reader.tensors[name], start, stop)).sub_(base)
                require_finite(delta, expert.expert.folder, name)
                if expert.index in trims:
                    trims[expert.index].apply(delta, scratch)
                method.add(state, delta, plan.weights[expert.index])
            if self.state_out is not None:
                for key, accumulator in state.items():
                    self.state_out.write_range(state_key(key, name), start, accumulator.cpu())
            merged = base.add_(method.delta(state, plan.total_weight, base))
            self.writer.write_range(name, start, host.take("out", shape, target).copy_(merged))


def stream_merge(base: CheckpointReader, experts: list[WeightedExpert], tensors: Methods,
                 merged_names: set[str], writer: CheckpointWriter, dtype: torch.dtype | None = None,
                 state_in: CheckpointReader | None = None, state_out: CheckpointWriter | None = None,
                 device: torch.device | str | None = None) -> None:
    """Merge every tensor of `base` into `writer`, each with its method and weights from `tensors`; tensors
    outside `merged_names` are copied from the base. DEVICE: where the arithmetic runs (default the CPU).

    With `state_in`, the method's accumulators start from a saved state instead of zeros (incremental
    merge); with `state_out`, the accumulators after folding `experts` are saved.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    names = base.names()
    in_blocks = {name for name, info in base.tensors.items() if info.numel > 0 and (
        name not in merged_names or blockwise(tensors[name], experts, name, info.shape))}
    threads, files, futures, whole = torch.get_num_threads(), RangeReader(), {}, None
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="mergeplan-merge")
    try:
        if in_blocks & merged_names:
            torch.set_num_threads(1)  # parallel over tensors instead: per-op threading costs more than a block's work
        blocks = BlockMerge(base, experts, tensors, writer, dtype, state_in, state_out, device, files)
        # the largest tensors first, so that no worker is left alone with a big one at the end
        for name in sorted(in_blocks, key=lambda name: -base.tensors[name].numel):
            futures[name] = pool.submit(blocks.merge if name in merged_names else blocks.copy, name)
        whole = merge_whole(base, experts, tensors, [name for name in names if name not in in_blocks],
                            merged_names, writer, dtype, state_in, state_out, device)
        for name in progress_bar(names, "merge", "tensor"):
            if name in futures:
                futures[name].result()
            else:
                next(whole)
    finally:
        if whole is not None:
            whole.close()
        for future in futures.values():
            future.cancel()
        pool.shutdown(wait=True)
        torch.set_num_threads(threads)
        files.close()


def merge_whole(base: CheckpointReader, experts: list[WeightedExpert], tensors: Methods, names: list[str],
                merged_names: set[str], writer: CheckpointWriter, dtype: torch.dtype | None,
                state_in: CheckpointReader | None, state_out: CheckpointWriter | None,
                device: torch.device) -> Iterator[None]:
    """Merge (or copy) the tensors NAMES whole, in order, yielding after each."""
    def jobs() -> Iterator[Callable[[], object]]:
        for name in names:
            yield lambda name=name: base.read(name)
            if name in merged_names:
                if state_in is not None:
                    for key in tensors[name].method.state_names:
                        yield lambda key=key, name=name: state_in.read(state_key(key, name))
                for expert in experts:
                    yield lambda source=expert.expert, name=name: source.load(name)

    tensors_read = read_ahead(jobs())
    cpu = torch.device("cpu")
    scratches, host, on_cpu = {cpu: Scratch(), device: Scratch(device)}, Scratch(), set()
    for name in names:
        stored = next(tensors_read)
        target = output_dtype(stored.dtype, dtype)
        if name not in merged_names:
            writer.write(name, stored.to(target))
            yield
            continue
        plan = tensors[name]
        method = plan.method
        where = device if device.type == "cpu" or on_device(plan, experts) else cpu
        if where != device and type(method).name not in on_cpu:
            on_cpu.add(type(method).name)
            log.info("%s merges on the CPU, not %s (some of its steps create CPU tensors)", type(method).name, device)
        scratch = scratches[where]
        base_tensor = scratch.take("base", stored.shape).copy_(stored)
        require_finite(base_tensor, base.folder, name)
        if isinstance(method, GroupMethod):
            inputs = [expert.expert.task_vector(name, next(tensors_read), base_tensor, torch.empty_like(base_tensor))
                      for expert in experts]
            full = [base_tensor + vector if vector is not None else base_tensor for vector in inputs]
            merged = method.merge(base_tensor, full, plan.weights, name)
            writer.write(name, merged.to(target))
            yield
            continue
        if state_in is not None:
            state = {key: next(tensors_read).to(where) for key in method.state_names}
        else:
            state = {key: scratch.take(key, method.state_shape(key, stored.shape)).zero_()
                     for key in method.state_names}
        delta = scratch.take("delta", stored.shape)
        for expert in experts:
            vector = expert.expert.task_vector(name, to_device(next(tensors_read), where), base_tensor, delta)
            if vector is not None:  # a zero task vector adds nothing to any method's accumulators
                sparsifier = plan.sparsifiers[expert.index]
                method.add(state, sparsifier.sparsify(vector, name, expert.index), plan.weights[expert.index])
        if state_out is not None:
            for key, value in state.items():
                state_out.write(state_key(key, name), value.cpu())
        merged = base_tensor.add_(method.delta(state, plan.total_weight, base_tensor))
        writer.write(name, host.take("out", merged.shape, target).copy_(merged))
        yield
