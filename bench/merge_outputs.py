"""Output equality for bench/merge_speed.py: two checkpoint folders compared tensor by tensor, with the TIES entries
whose result the maths leaves open (threshold ties, zero sign sums) counted apart."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from merging.io.checkpoint import CheckpointReader
from merging.methods.sparsify import magnitude_trim_

RTOL, ATOL = 1e-2, 1e-5  # about one bf16 ulp (2^-8 relative) with headroom
# Why ties is not bit-identical to mergekit (verified on the tiny preset; neither is float rounding):
KNOWN_DIFFERENCES = """\
Known differences (ties only; task_arithmetic is bit-identical):
- Trim ties: bf16 deltas take few distinct values, so hundreds of entries per tensor share the k-th
  largest magnitude. mergeplan keeps those in index order (a stable descending sort); mergekit keeps
  whichever its default, unstable `argsort` puts first. 1-4% of output entries differ (more with more
  experts), each by up to about one trimmed delta.
- Entries whose Σ trim(τi) is exactly 0 with nonzero entries (e.g. +x and -x) are counted apart too, though
  both tools now elect + there (mergekit's rule).
The equality check therefore counts these entries apart (computed from the inputs): outside them the two
outputs must agree to float tolerance, and the share of entries that differ inside them is reported.
"""


@dataclass
class Comparison:
    max_abs_diff: float = 0.0
    mismatched: int = 0  # entries with |a - b| > ATOL + RTOL·|b|, outside the undefined ones
    unequal: int = 0  # entries that are not bit-identical
    total: int = 0
    undefined: int = 0  # ties entries where the two tools' rules legitimately differ (see KNOWN_DIFFERENCES)
    undefined_mismatched: int = 0
    problems: list[str] = field(default_factory=list)  # missing tensors, shape or dtype differences

    @property
    def passed(self) -> bool:
        return not self.problems and self.mismatched == 0


def ties_undefined_entries(base: torch.Tensor, experts: list[torch.Tensor], density: float) -> torch.Tensor:
    """Entries where TIES' result depends on a rule the maths leaves open: an expert's magnitude ties with
    its trim threshold and the tie-break decides whether it is kept, or the kept deltas sum to exactly 0."""
    undefined = torch.zeros(base.shape, dtype=torch.bool)
    elected = torch.zeros(base.shape)
    nonzero = torch.zeros(base.shape, dtype=torch.bool)
    for expert in experts:
        delta = expert.float() - base.float()
        trimmed = magnitude_trim_(delta.clone(), density)
        kept = trimmed != 0
        if kept.any():
            threshold = delta.abs()[kept].min()
            at_threshold = delta.abs() == threshold
            if int((delta.abs() >= threshold).sum()) > int(kept.sum()):
                undefined |= at_threshold
        elected += trimmed
        nonzero |= kept
    return undefined | ((elected == 0) & nonzero)


def compare_outputs(ours: Path, theirs: Path, ties_inputs: tuple[Path, list[Path]] | None = None,
                    density: float = 0.5) -> Comparison:
    """Compare every tensor of two checkpoint folders, one tensor at a time. With `ties_inputs` (base and
    experts, trimmed to DENSITY), entries whose TIES result is undefined by the maths are counted apart."""
    a, b = CheckpointReader(ours), CheckpointReader(theirs)
    inputs = None
    if ties_inputs is not None:
        inputs = (CheckpointReader(ties_inputs[0]), [CheckpointReader(e) for e in ties_inputs[1]])
    result = Comparison()
    for name in sorted(set(a.names()) ^ set(b.names())):
        result.problems.append(f"{name} only in {'ours' if name in a.tensors else 'mergekit'}")
    for name in sorted(set(a.names()) & set(b.names())):
        x, y = a.read(name), b.read(name)
        if x.shape != y.shape or x.dtype != y.dtype:
            result.problems.append(f"{name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
            continue
        x, y = x.float(), y.float()
        diff = (x - y).abs()
        beyond = diff > ATOL + RTOL * y.abs()
        if inputs is not None:
            undefined = ties_undefined_entries(inputs[0].read(name), [e.read(name) for e in inputs[1]], density)
            result.undefined += int(undefined.sum())
            result.undefined_mismatched += int((beyond & undefined).sum())
            beyond &= ~undefined
            diff = diff.masked_fill(undefined, 0)
        result.max_abs_diff = max(result.max_abs_diff, float(diff.max()))
        result.mismatched += int(beyond.sum())
        result.unequal += int((x != y).sum())
        result.total += x.numel()
    return result


def describe(comparison: Comparison) -> str:
    verdict = "PASS" if comparison.passed else "FAIL"
    share = comparison.mismatched / max(comparison.total, 1)
    text = (f"{verdict}: max |diff| {comparison.max_abs_diff:.3g}, {share:.2e} of entries beyond tolerance, "
            f"{comparison.unequal} of {comparison.total} not bit-identical")
    if comparison.undefined:
        text += (f"; {comparison.undefined} entries ({comparison.undefined / comparison.total:.2%}) undefined by "
                 f"the maths (threshold ties, zero sign sums), {comparison.undefined_mismatched} of them differ")
    if comparison.problems:
        text += f"; {len(comparison.problems)} problems, e.g. {comparison.problems[0]}"
    return text
