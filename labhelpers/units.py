"""Units of memory and size, one definition for every module: binary MiB and GiB.

``to_mib(n_bytes)`` converts a byte count; :func:`files_mib` measures what a model or an adapter
takes on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

MiB = 2**20
GiB = 2**30


def to_mib(n_bytes: float) -> float:
    """``n_bytes`` in MiB (2**20 bytes)."""
    return n_bytes / MiB


def files_mib(paths: Iterable[str | Path]) -> float:
    """The size on disk of ``paths`` (files only; folders in the iterable are skipped), in MiB."""
    return to_mib(sum(Path(p).stat().st_size for p in paths if Path(p).is_file()))
