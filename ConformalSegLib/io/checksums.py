"""File checksums recorded in provenance (model weights, calibration summaries)."""

from __future__ import annotations

import hashlib
from os import PathLike


def sha256_file(path: str | PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
