"""Named inputs to arrays and outputs to named columns: the pieces the families' serving hooks share.

Errors are RatchetErrors that name the column and the row; a row is named by the frame's index
(`ratchet predict` indexes by file line or image path, a served request by position).
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import pandas as pd

from ratchet.errors import RatchetError

IMAGE_COLUMN = "image"  # base64 of an image file's bytes (PNG, JPEG, ...): any size and mode


def _row(frame: pd.DataFrame, i: int) -> str:
    return f"{frame.index.name or 'row'} {frame.index[i]}"


def numbers(frame: pd.DataFrame, columns: list[str], allow_missing: bool) -> np.ndarray:
    """The `columns` as a float32 (rows, columns) array: numbers (int or float, any width, or
    numeric text); NaN only if `allow_missing`; nothing float32 cannot hold."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise RatchetError(f"column '{missing[0]}' not found ({len(missing)} of the model's {len(columns)} input "
                           f"columns missing)")
    out = np.empty((len(frame), len(columns)), dtype=np.float32)
    limit = np.finfo(np.float32).max
    for j, column in enumerate(columns):
        raw = frame[column]
        values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.isnan(values) & raw.notna().to_numpy() & (raw.astype(str).str.strip() != "").to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            raise RatchetError(f"column '{column}', {_row(frame, i)}: {raw.iloc[i]!r} is not a number")
        if not allow_missing and np.isnan(values).any():
            i = int(np.argmax(np.isnan(values)))
            raise RatchetError(f"column '{column}', {_row(frame, i)}: empty (the model needs every value)")
        infinite = np.abs(values) > limit  # inf and what float32 cannot hold (NaN compares False)
        if infinite.any():
            i = int(np.argmax(infinite))
            raise RatchetError(f"column '{column}', {_row(frame, i)}: {raw.iloc[i]!r} is not a finite float32 number")
        out[:, j] = values
    return out


def class_columns(logits: np.ndarray, classes: list[str], prefix: str = "") -> dict[str, np.ndarray]:
    """`<prefix>label` (the class name), `<prefix>probability` (its softmax probability) and
    `<prefix>prob_<class>` for every class, from logits (rows, classes)."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    best = p.argmax(axis=1)
    columns = {f"{prefix}label": np.asarray(classes, dtype=object)[best], f"{prefix}probability": p.max(axis=1)}
    columns.update({f"{prefix}prob_{name}": p[:, k] for k, name in enumerate(classes)})
    return columns


def class_schema(classes: list[str], prefix: str = ""):
    from mlflow.types import ColSpec

    return [ColSpec("string", f"{prefix}label"), ColSpec("double", f"{prefix}probability"),
            *(ColSpec("double", f"{prefix}prob_{name}") for name in classes)]


def encode_file(path) -> str:
    """An image file's bytes as base64 text, the `image` column's format."""
    from pathlib import Path

    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def encode_array(pixels: np.ndarray) -> str:
    """A (C, H, W) uint8 array as base64 PNG text (input examples)."""
    from PIL import Image

    image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def images(frame: pd.DataFrame, mode: str, size: list[int]) -> np.ndarray:
    """The `image` column (base64 file bytes) decoded as training decoded its images: converted
    to `mode`, high-depth images by their range, resized to `size` (H, W): uint8 (N, C, H, W)."""
    from ratchet.data.image import decode

    if IMAGE_COLUMN not in frame.columns:
        raise RatchetError(f"column '{IMAGE_COLUMN}' not found (base64-encoded image files)")
    height, width = size
    out = np.empty((len(frame), 1 if mode == "L" else 3, height, width), dtype=np.uint8)
    for i, text in enumerate(frame[IMAGE_COLUMN]):
        try:
            data = base64.b64decode(text if isinstance(text, (bytes, str)) else "", validate=True)
        except (binascii.Error, ValueError):
            raise RatchetError(f"column '{IMAGE_COLUMN}', {_row(frame, i)}: not base64 text") from None
        try:
            out[i] = decode(io.BytesIO(data), mode, (width, height))
        except Exception as exc:  # Pillow's errors for a file that is not an image
            raise RatchetError(f"column '{IMAGE_COLUMN}', {_row(frame, i)}: not an image "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return out


def image_files(path) -> tuple[list, object]:
    """(the image files at `path`, the folder their names are relative to): one file, or every
    image file under a folder, at any depth, sorted; hidden files and other files skipped."""
    from pathlib import Path

    from ratchet.data.image import EXTENSIONS

    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in EXTENSIONS:
            raise RatchetError(f"{path}: not an image file ({', '.join(EXTENSIONS)})")
        return [path], path.parent
    if not path.is_dir():
        raise RatchetError(f"{path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise RatchetError(f"{path}: no image files in it ({', '.join(EXTENSIONS)})")
    return files, path
