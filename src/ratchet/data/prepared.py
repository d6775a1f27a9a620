"""The prepared-data contract every family's prepare writes and train/evaluate read.

A prepared directory holds `<split>_x.npy`, `<split>_y.npy` (and any other named arrays) plus
`meta.json` describing them. It is written to a temporary sibling and swapped in with one
rename, so a failed prepare never leaves a half-written directory behind. Arrays are loaded
memory-mapped, so a dataset larger than RAM still works.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ratchet.errors import RatchetError

META = "meta.json"


@dataclass(frozen=True)
class Prepared:
    """Prepared arrays (memory-mapped) and their description."""

    dir: Path
    meta: dict

    def array(self, name: str) -> np.ndarray:
        path = self.dir / f"{name}.npy"
        if not path.is_file():
            raise RatchetError(f"{path}: missing from the prepared data; run the prepare stage again")
        return np.load(path, mmap_mode="r")

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return self.array(f"{split}_x"), self.array(f"{split}_y")


def write_prepared(out_dir: Path, arrays: dict[str, np.ndarray], meta: dict) -> dict:
    """Write arrays and meta.json atomically; return meta with `data_hash` (sha256 of the arrays)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        digest = hashlib.sha256()
        for name in sorted(arrays):
            path = tmp / f"{name}.npy"
            np.save(path, np.ascontiguousarray(arrays[name]))
            digest.update(name.encode())
            digest.update(path.read_bytes())
        meta = {**meta, "data_hash": digest.hexdigest()}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def replace_dir(src: Path, dst: Path) -> None:
    """Put directory `src` at `dst`, replacing what was there (the old copy is removed after)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_prepared(prepared_dir: Path) -> Prepared:
    """Open a prepared directory; a clear error if prepare has not run."""
    prepared_dir = Path(prepared_dir)
    meta_path = prepared_dir / META
    if not meta_path.is_file():
        raise RatchetError(f"{prepared_dir}: no prepared data (missing {META}); run the prepare stage first")
    return Prepared(dir=prepared_dir, meta=json.loads(meta_path.read_text()))


def write_json(path: Path, content: dict) -> None:
    """Write a JSON file atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(content, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
