"""Tabular family: a CSV with one label column becomes standardised float32 arrays.

Validation names the file, the column and the line. The split is stratified by class and
fixed by the seed. Imputation and scaling statistics come from the training split only;
val and test are transformed with them, never used to fit them. The raw test features are
kept too, so the promotion gate can score any registered model (which carries its own
preprocessing) on exactly the same rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ratchet.config import TabularPipeline
from ratchet.data.prepared import read_csv, write_prepared
from ratchet.data.split import stratified_split
from ratchet.errors import RatchetError

SPLITS = ("train", "val", "test")


def prepare(cfg: TabularPipeline) -> dict:
    """Validate, split, impute, scale and write the prepared arrays; return meta.json's content."""
    source = cfg.data.source
    features, labels = read_table(source, cfg.data.label, cfg.data.exclude)
    if cfg.prepare.impute == "drop":
        keep = ~features.isna().any(axis=1)
        features, labels = features[keep], labels[keep]
        if labels.nunique() < 2:
            raise RatchetError(f"{source}: fewer than two classes left after dropping rows with missing values")
    classes, y = encode_labels(labels)
    rows = features.index.to_numpy()  # 0-based data-row numbers in the CSV
    x_raw = features.to_numpy(dtype=np.float32)
    parts = stratified_split(y, classes, {"test": cfg.prepare.test_fraction, "val": cfg.prepare.val_fraction},
                             cfg.seed, source)
    parts = {split: parts[split] for split in SPLITS}

    train_x = x_raw[parts["train"]]
    fill = _fill_values(train_x, cfg.prepare.impute, list(features.columns), source)
    train_filled = np.where(np.isnan(train_x), fill, train_x)
    mean = train_filled.mean(axis=0)
    std = train_filled.std(axis=0)
    std[std == 0] = 1.0  # a constant column scales to zeros, not NaN

    arrays = {}
    for split, idx in parts.items():
        arrays[f"{split}_x"] = transform(x_raw[idx], fill, mean, std)
        arrays[f"{split}_y"] = y[idx]
        arrays[f"{split}_ids"] = rows[idx]
    arrays["test_x_raw"] = x_raw[parts["test"]]
    meta = {
        "family": "tabular",
        "id": "row",  # <split>_ids: 0-based data-row numbers of the CSV
        "serving_input": "test_x_raw",  # what a registered model takes: raw features, NaN included
        "source": str(source),
        "label": cfg.data.label,
        "features": list(features.columns),
        "input_shape": [len(features.columns)],
        "classes": classes,
        "rows": {split: int(len(idx)) for split, idx in parts.items()},
        "class_counts": {s: np.bincount(y[i], minlength=len(classes)).tolist() for s, i in parts.items()},
        "impute": cfg.prepare.impute,
        "fill": fill.tolist(),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "seed": cfg.seed,
    }
    return write_prepared(cfg.prepare.out_dir, arrays, meta)


def transform(x: np.ndarray, fill: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Impute with `fill`, then standardise; the same arithmetic the served model applies."""
    return ((np.where(np.isnan(x), fill, x) - mean) / std).astype(np.float32)


def read_table(source: Path, label: str, exclude: list[str]) -> tuple[pd.DataFrame, pd.Series]:
    """Read and validate the CSV: numeric features, a label column with at least two classes."""
    df = read_csv(source, [label, *exclude])
    labels = df[label]
    features = df.drop(columns=[label, *exclude])
    if features.shape[1] == 0:
        raise RatchetError(f"{source}: no feature columns besides the label '{label}'")
    for column in features.columns:
        numeric = pd.to_numeric(features[column], errors="coerce")
        bad = numeric.isna() & features[column].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            value = features[column].iloc[row]
            raise RatchetError(f"{source}: column '{column}' is not numeric (line {row + 2}: {value!r})")
        features[column] = numeric
    missing = labels.isna().to_numpy()
    if missing.any():
        raise RatchetError(
            f"{source}: label column '{label}' is empty on {int(missing.sum())} rows (first: line {int(np.flatnonzero(missing)[0]) + 2})"
        )
    if labels.nunique() < 2:
        raise RatchetError(f"{source}: label column '{label}' has a single class ({labels.iloc[0]!r}); need at least two")
    return features, labels


def encode_labels(labels: pd.Series) -> tuple[list[str], np.ndarray]:
    """Class names in sorted order (numeric order for numeric labels) and int64 class indices."""
    values = labels.to_numpy()
    if pd.api.types.is_float_dtype(labels) and np.all(np.mod(values, 1) == 0):
        values = values.astype(np.int64)  # 0.0/1.0 read as floats are the classes "0"/"1"
    uniques, y = np.unique(values, return_inverse=True)
    return [str(u) for u in uniques], y.astype(np.int64)


def _fill_values(train_x: np.ndarray, impute: str, columns: list[str], source: Path) -> np.ndarray:
    observed = ~np.isnan(train_x)
    empty = np.flatnonzero(~observed.any(axis=0))
    if len(empty):
        raise RatchetError(f"{source}: column '{columns[empty[0]]}' has no values in the training split")
    if impute == "mean":
        return np.nanmean(train_x, axis=0).astype(np.float32)
    return np.nanmedian(train_x, axis=0).astype(np.float32)  # median; for drop no NaN is left
