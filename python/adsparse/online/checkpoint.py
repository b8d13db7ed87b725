"""Atomic checkpoints of an online run, written at every period end.

A checkpoint is one file: a crash while writing leaves the previous one intact (write to a
temporary file in the same directory, flush, fsync, then ``os.replace``), so a resumed run
always restarts at a period boundary that was fully completed — nothing lost, nothing repeated.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_NAME", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_NAME = "online.pt"


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/online.pt`` atomically; returns the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_NAME
    fd, tmp = tempfile.mkstemp(prefix=".online-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The saved state, or ``None`` when ``directory`` holds no checkpoint yet."""
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        return None
    # Our own file: it pickles whole modules (block patterns are structure), so not weights_only.
    return torch.load(path, map_location="cpu", weights_only=False)
