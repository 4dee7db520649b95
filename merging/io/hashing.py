"""The sha256 of a file, read in blocks: the one digest behind zoo recipes, S3 manifests and cache keys."""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 8 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()
