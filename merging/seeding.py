"""Seeds derived from names, so that randomness does not depend on processing order, threads or machine."""

import hashlib

import torch


def derived_seed(seed: int, *parts: object) -> int:
    digest = hashlib.sha256("\0".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator for one (seed, *parts), e.g. (seed, tensor name, expert index)."""
    return torch.Generator().manual_seed(derived_seed(seed, *parts))
