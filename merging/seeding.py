"""Seeds derived from names, so that randomness does not depend on processing order, threads or machine."""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def derived_seed(seed: int, *parts: object) -> int:
    digest = hashlib.sha256("\0".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU torch generator for one (seed, *parts), e.g. (seed, tensor name, expert index)."""
    import torch

    return torch.Generator().manual_seed(derived_seed(seed, *parts))


def python_rng(seed: int, *parts: object) -> random.Random:
    """A Python RNG for one (seed, *parts), e.g. (seed, domain, split); needs no torch."""
    return random.Random(derived_seed(seed, *parts))
