"""Self-describing checkpoints, written atomically and loaded with weights_only=True.

A checkpoint holds the unwrapped model state, optimizer, scheduler, completed epochs, every
process's RNG state, early-stopping state, the per-epoch history, the resolved config and
the MLflow run id: everything a restarted process needs to continue exactly where it was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file in the same directory, then `os.replace`: a crash mid-write
    leaves the previous checkpoint intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
