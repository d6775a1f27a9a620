"""Tabular family: a CSV with one label column becomes standardised float32 arrays.

Validation names the file, the column and the line. The test and validation rows come from
their own files (data.test, data.val) or are split off the training file, stratified by class
and fixed by the seed; the files must have the same columns and the training file's classes. Imputation and scaling statistics come from the training split only;
val and test are transformed with them, never used to fit them. The raw test features are
kept too, so the promotion gate can score any registered model (which carries its own
preprocessing) on exactly the same rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ratchet.config import TabularPipeline
from ratchet.data.prepared import project_path, read_csv, row_keys, write_prepared
from ratchet.data.split import stratified_split
from ratchet.errors import RatchetError

SPLITS = ("train", "val", "test")


def prepare(cfg: TabularPipeline, root: Path) -> dict:
    """Validate, split, impute, scale and write the prepared arrays; return meta.json's content
    (its paths relative to the project folder `root`)."""
    data = cfg.data
    files = {split: data.file(split) for split in SPLITS}  # val/test None: held out of the training file
    tables = {split: read_table(path, data, cfg.prepare.non_finite) for split, path in files.items() if path}
    columns = list(tables["train"][0].columns)
    first_line = tables["train"][0].attrs["first_line"]  # 1 for files without a header row
    for split, (features, _) in tables.items():
        _same_columns(files[split], list(features.columns), columns, files["train"])
    if cfg.prepare.impute == "drop":
        for split, (features, labels) in list(tables.items()):
            keep = ~features.isna().any(axis=1)
            tables[split] = features[keep], labels[keep]
            if labels[keep].nunique() < 2 and split == "train":
                raise RatchetError(f"{files[split]}: fewer than two classes left after dropping rows with "
                                   "missing values")
    classes, encoded = encode_labels({split: labels for split, (_, labels) in tables.items()}, files, first_line)

    # rows: (file split, 0-based data-row numbers of that file) of every prepared split
    train_x = tables["train"][0][columns].to_numpy(dtype=np.float32)
    held_out = {split: getattr(cfg.prepare, f"{split}_fraction") for split in ("test", "val") if not files[split]}
    parts = stratified_split(encoded["train"], classes, held_out, cfg.seed, files["train"]) if held_out \
        else {"train": np.arange(len(train_x))}
    rows = tables["train"][0].index.to_numpy()
    x_raw = {split: train_x[idx] for split, idx in parts.items()}
    y = {split: encoded["train"][idx] for split, idx in parts.items()}
    ids = {split: rows[idx] for split, idx in parts.items()}
    for split in ("val", "test"):
        if files[split]:
            features = tables[split][0]
            x_raw[split] = features[columns].to_numpy(dtype=np.float32)
            y[split], ids[split] = encoded[split], features.index.to_numpy()
            if len(y[split]) == 0:
                raise RatchetError(f"{files[split]}: no rows left for the {split} split")

    fill = _fill_values(x_raw["train"], cfg.prepare.impute, columns, files["train"])
    train_filled = np.where(np.isnan(x_raw["train"]), fill, x_raw["train"])
    mean = train_filled.mean(axis=0)
    std = train_filled.std(axis=0)
    std[std == 0] = 1.0  # a constant column scales to zeros, not NaN

    arrays = {}
    for split in SPLITS:
        arrays[f"{split}_x"] = transform(x_raw[split], fill, mean, std)
        arrays[f"{split}_y"] = y[split]
        arrays[f"{split}_ids"] = ids[split]
        arrays[f"{split}_keys"] = row_keys(x_raw[split])  # the gate's overlap check (raw feature values)
    arrays["test_x_raw"] = x_raw["test"]
    meta = {
        "family": "tabular",
        "id": "row",  # <split>_ids: 0-based data-row numbers of that split's file (files)
        "serving_input": "test_x_raw",  # what a registered model takes: raw features, NaN included
        "source": project_path(files["train"], root),
        "files": {split: project_path(files[split] or files["train"], root) for split in SPLITS},
        "label": data.label,
        "features": columns,
        "input_shape": [len(columns)],
        "classes": classes,
        "rows": {split: int(len(y[split])) for split in SPLITS},
        "class_counts": {split: np.bincount(y[split], minlength=len(classes)).tolist() for split in SPLITS},
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


def read_table(source: Path, data, non_finite: str = "fail") -> tuple[pd.DataFrame, pd.Series]:
    """Read and validate one CSV: numeric, finite features (inf kept as missing with
    `non_finite: impute`), a label column with no empty value, at least two classes in it."""
    label, exclude = data.label, data.exclude
    df = read_csv(source, [label, *exclude], columns=data.columns, delimiter=data.delimiter)
    first_line = df.attrs["first_line"]
    labels = df[label]
    features = df.drop(columns=[label, *exclude])
    if features.shape[1] == 0:
        raise RatchetError(f"{source}: no feature columns besides the label '{label}'")
    limit = np.finfo(np.float32).max
    for column in features.columns:
        numeric = pd.to_numeric(features[column], errors="coerce")
        bad = numeric.isna() & features[column].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            value = features[column].iloc[row]
            raise RatchetError(f"{source}: column '{column}' is not numeric (line {row + first_line}: {value!r})")
        numeric = numeric.astype(np.float64)
        infinite = (numeric.abs() > limit).to_numpy()  # inf, -inf, and what float32 cannot hold
        if infinite.any():
            if non_finite == "fail":
                row = int(np.flatnonzero(infinite)[0])
                raise RatchetError(
                    f"{source}: column '{column}', line {row + first_line}: '{features[column].iloc[row]}' is not a "
                    f"finite float32 number ({int(infinite.sum())} such values in the column; "
                    "prepare.non_finite: impute treats them as missing)")
            numeric[infinite] = np.nan
        features[column] = numeric
    features.attrs["first_line"] = first_line
    missing = labels.isna().to_numpy()
    if missing.any():
        raise RatchetError(f"{source}: label column '{label}' is empty on {int(missing.sum())} rows "
                           f"(first: line {int(np.flatnonzero(missing)[0]) + first_line})")
    return features, labels


def encode_labels(labels: dict[str, pd.Series], files: dict, first_line: int = 2
                  ) -> tuple[list[str], dict[str, np.ndarray]]:
    """Class names of the training file in sorted order (numeric order for numeric labels) and
    int64 class indices per split; a class of a validation or test file that the training file
    lacks is an error naming it and its line."""
    whole = pd.concat(list(labels.values()), ignore_index=True)  # one dtype for every file
    values = whole.to_numpy()
    if pd.api.types.is_float_dtype(whole) and np.all(np.mod(values, 1) == 0):
        values = values.astype(np.int64)  # 0.0/1.0 read as floats are the classes "0"/"1"
    if values.dtype == object:
        values = values.astype(str)
    parts, start = {}, 0
    for split, series in labels.items():
        parts[split], start = values[start : start + len(series)], start + len(series)
    uniques = np.unique(parts["train"])
    if len(uniques) < 2:
        raise RatchetError(f"{files['train']}: label column '{labels['train'].name}' has a single class "
                           f"('{uniques[0]}'); need at least two")
    encoded = {}
    for split, part in parts.items():
        unknown = ~np.isin(part, uniques)
        if unknown.any():
            i = int(np.flatnonzero(unknown)[0])
            line = labels[split].index[i] + first_line
            raise RatchetError(f"{files[split]}: line {line}: label '{part[i]}' is not a "
                               f"class of the training file {Path(files['train']).name} "
                               f"(classes: {', '.join(map(str, uniques))})")
        encoded[split] = np.searchsorted(uniques, part).astype(np.int64)
    return [str(u) for u in uniques], encoded


def _same_columns(path: Path, found: list[str], expected: list[str], train: Path) -> None:
    if found == expected:
        return
    missing = [c for c in expected if c not in found]
    if missing:
        raise RatchetError(f"{path}: column '{missing[0]}' of {Path(train).name} is missing "
                           f"({len(missing)} missing in all)")
    extra = [c for c in found if c not in expected]
    if extra:
        raise RatchetError(f"{path}: column '{extra[0]}' is not in {Path(train).name}; the files must have the "
                           "same columns (or list it in data.exclude)")


def _fill_values(train_x: np.ndarray, impute: str, columns: list[str], source: Path) -> np.ndarray:
    observed = ~np.isnan(train_x)
    empty = np.flatnonzero(~observed.any(axis=0))
    if len(empty):
        raise RatchetError(f"{source}: column '{columns[empty[0]]}' has no values in the training split")
    if impute == "mean":
        return np.nanmean(train_x, axis=0).astype(np.float32)
    return np.nanmedian(train_x, axis=0).astype(np.float32)  # median; for drop no NaN is left
