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
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ratchet.errors import RatchetError

META = "meta.json"
ISO_TIME = re.compile(r"^\d{4}-\d{2}(-\d{2})?([ T]\d{1,2}:\d{2}.*)?$")


@dataclass(frozen=True)
class Prepared:
    """Prepared arrays (memory-mapped) and their description: the family's typed meta record
    (ratchet.families.<family>.<Family>.Meta)."""

    dir: Path
    meta: object

    def array(self, name: str) -> np.ndarray:
        path = self.dir / f"{name}.npy"
        if not path.is_file():
            raise RatchetError(f"{path}: missing from the prepared data; run the prepare stage again")
        return np.load(path, mmap_mode="r")

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return self.array(f"{split}_x"), self.array(f"{split}_y")


class PreparedWriter:
    """Arrays written one by one into a temporary directory (see `prepared_writer`)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp

    def save(self, name: str, array: np.ndarray) -> None:
        np.save(self.tmp / f"{name}.npy", np.ascontiguousarray(array))

    def allocate(self, name: str, shape: tuple[int, ...], dtype) -> np.memmap:
        """A writable memory-mapped .npy to fill in place (for arrays larger than memory)."""
        return np.lib.format.open_memmap(self.tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)

    def finish(self, meta: dict) -> dict:
        """Hash the arrays (streamed), write meta.json; return meta with `data_hash`."""
        digest = hashlib.sha256()
        for path in sorted(self.tmp.glob("*.npy")):
            digest.update(path.stem.encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        meta = {**meta, "data_hash": digest.hexdigest()}
        (self.tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        return meta


@contextmanager
def prepared_writer(out_dir: Path) -> Iterator[PreparedWriter]:
    """Write a prepared directory beside `out_dir`, swap it in on success, remove it on failure."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir)  # before any work: a foreign directory there stays untouched
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield PreparedWriter(tmp)
        if not (tmp / META).is_file():
            raise RuntimeError("prepared_writer: finish() was not called")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def project_path(path: Path, root: Path) -> str:
    """`path` as meta.json records it: relative to the project (`root`, the folder of params.yaml),
    as params.yaml writes paths, so two checkouts in different folders prepare byte-identical
    data (and DVC hashes it alike). A path that shares no folder with the project but the
    filesystem's root (another disk or mount) stays absolute."""
    path, root = Path(path), Path(root)
    if os.path.commonpath([path, root]) == path.anchor:
        return path.as_posix()
    return Path(os.path.relpath(path, root)).as_posix()


def write_prepared(out_dir: Path, arrays: dict[str, np.ndarray], meta: dict) -> dict:
    """Write in-memory arrays and meta.json atomically; return meta with `data_hash`."""
    with prepared_writer(out_dir) as writer:
        for name, array in arrays.items():
            writer.save(name, array)
        meta = writer.finish(meta)
    return meta


OUTPUT_MARKER = ".ratchet-output"


def check_replaceable(dst: Path) -> None:
    """Refuse an output path that holds something a stage did not write: a stage replaces its
    output directory as a whole, and only one that carries its marker (or an empty one)."""
    dst = Path(dst)
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise RatchetError(f"{dst}: an output directory is expected there, and it is a file or a link; "
                           "it is left as it is: move it away or choose another output path")
    if dst.is_dir() and not (dst / OUTPUT_MARKER).is_file() and any(dst.iterdir()):
        raise RatchetError(f"{dst}: not an output a ratchet stage wrote (no {OUTPUT_MARKER} in it), so it is not "
                           "replaced: move it away or choose another output path")


def replace_dir(src: Path, dst: Path) -> None:
    """Put directory `src` at `dst`, replacing what was there (the old copy is removed after):
    only a directory a stage wrote before (its marker file) or an empty one is replaced."""
    src, dst = Path(src), Path(dst)
    check_replaceable(dst)
    (src / OUTPUT_MARKER).write_text("written by a ratchet stage, which replaces this directory as a whole\n")
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_prepared(prepared_dir: Path, meta_type) -> Prepared:
    """Open a prepared directory whose meta.json is a `meta_type` record (a pydantic model);
    a clear error if prepare has not run, or wrote it for another family or an older version."""
    from pydantic import ValidationError

    prepared_dir = Path(prepared_dir)
    meta_path = prepared_dir / META
    if not meta_path.is_file():
        raise RatchetError(f"{prepared_dir}: no prepared data (missing {META}); run the prepare stage first")
    try:
        meta = meta_type.model_validate_json(meta_path.read_text())
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise RatchetError(f"{meta_path}: not what this family's prepare writes ({where}: {err['msg']}); "
                           "run the prepare stage again") from None
    return Prepared(dir=prepared_dir, meta=meta)


def row_keys(*columns: np.ndarray) -> np.ndarray:
    """A 64-bit content key per row of the given arrays (rows aligned): BLAKE2b of the row's
    bytes, NaN written one way. Two rows with the same values have the same key, whatever file
    or split they came from: the promotion gate compares test rows with the rows a registered
    model trained on by these keys."""
    rows = []
    for column in columns:
        array = np.ascontiguousarray(column)
        if array.dtype.kind == "f":
            array = np.where(np.isnan(array), np.nan, array)  # one NaN bit pattern
        rows.append(array.reshape(len(array), -1).view(np.uint8).reshape(len(array), -1))
    data = np.concatenate(rows, axis=1) if rows else np.zeros((0, 0), np.uint8)
    return np.array([int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little")
                     for row in data], dtype=np.uint64)


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


def read_csv(path: Path, required: list[str], columns: list[str] | None = None, delimiter: str = ",",
             **options):
    """A CSV's data rows as a DataFrame with every `required` column; else a one-line
    RatchetError naming the file (missing, empty, unreadable, no rows, no such column, a column
    name twice, no header row). `columns` names the columns of a file without a header row.
    `frame.attrs["first_line"]` is the file line of the first data row (2, or 1 without header)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise RatchetError(f"{path}: file not found")

    def parse(**extra):
        try:
            return pd.read_csv(path, sep=delimiter, **extra)
        except pd.errors.EmptyDataError:
            raise RatchetError(f"{path}: file is empty") from None
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise RatchetError(f"{path}: not a readable CSV ({str(exc).strip().splitlines()[-1]})") from None

    first = [str(v).strip() for v in parse(header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0]]
    if columns is None:
        _check_header(path, first, delimiter)
        frame = parse(**options)
        frame.attrs["first_line"] = 2
    else:
        if len(first) != len(columns):
            raise RatchetError(f"{path}: data.columns names {len(columns)} columns but the first row has "
                               f"{len(first)} fields")
        if first == list(columns):  # a header of exactly these names (e.g. numbers): read it as one
            frame = parse(**options)
            frame.attrs["first_line"] = 2
        else:
            frame = parse(header=None, names=list(columns), **options)
            frame.attrs["first_line"] = 1
    if frame.empty:
        raise RatchetError(f"{path}: has a header but no data rows")
    for column in required:
        if column not in frame.columns:
            shown = ", ".join(map(str, frame.columns[:12])) + (", ..." if len(frame.columns) > 12 else "")
            hint = ""
            if columns is None and any(_is_value(name) for name in first if name):
                hint = ("; the header looks like data: if the file has no header row, name its "
                        f"{len(first)} columns with data.columns: [name1, name2, ...]")
            raise RatchetError(f"{path}: column '{column}' not found (columns: {shown}){hint}")
    return frame


def _is_value(text: str) -> bool:
    """A number or an ISO date/time: a data value, not a column name."""
    try:
        float(text)
        return True
    except ValueError:
        return ISO_TIME.match(text) is not None


def _check_header(path: Path, names: list[str], delimiter: str) -> None:
    """Refuse a header with a name twice (pandas would rename the second), a header of numbers
    (every non-empty name a number or an ISO date: a file without one, whose first data row would
    be taken as names and lost), or one column
    whose name holds another common separator."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise RatchetError(f"{path}: column name '{name}' appears twice in the header (columns {seen[name] + 1} "
                               f"and {i + 1}); rename one")
        seen[name] = i

    given = [name for name in names if name]  # an empty field is a missing value in a data row
    if given and all(_is_value(name) for name in given):
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise RatchetError(f"{path}: the first row ({shown}) is all numbers: the file seems to have no header row; "
                           f"name its {len(names)} columns in params with data.columns: [name1, name2, ...]")
    if len(names) == 1:
        for other in (";", "\t", "|", ","):
            if other != delimiter and other in names[0]:
                raise RatchetError(f"{path}: the header is one column {names[0][:60]!r}; the file seems to be "
                                   f"separated by {other!r}: set data.delimiter: {other!r}")
