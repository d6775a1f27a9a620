"""Prepare a time-series CSV: parse and order the timestamps, deal with repeated and missing
steps, split chronologically, fit the scaling on the training part only.

Writes, per split (train, val, test): `<split>_series.npy` (the input columns scaled, float32,
T x F), `<split>_raw.npy` (the same in original units: what the registered model takes and
what forecasts are scored against) and `<split>_time.npy` (timestamps, int64 ns). Windows are
not stored: train and evaluate take them as views of these series (ratchet.data.windows), each
split on its own, so no window straddles a split boundary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ratchet.data.prepared import read_csv, write_prepared
from ratchet.errors import RatchetError

SPLITS = ("train", "val", "test")
MISSING = ["", "NA", "NaN", "nan", "null"]  # an empty value, filled or refused as data.gaps says


def prepare(cfg) -> dict:
    data, win = cfg.data, cfg.window
    columns = data.inputs
    source = read_series(data.source, data, columns)
    step = _step(source, data, data.source)
    source = fill_gaps(source, step, data, data.source)
    n = len(source)
    n_test = 0 if data.test is not None else round(n * cfg.prepare.test_fraction)
    n_val = round(n * cfg.prepare.val_fraction)
    parts = {"train": source.iloc[: n - n_val - n_test], "val": source.iloc[n - n_val - n_test : n - n_test]}
    if data.test is None:
        parts["test"] = source.iloc[n - n_test :]
    else:
        test = read_series(data.test, data, columns)
        if test.index[0] <= source.index[-1]:
            raise RatchetError(f"{data.test}: starts at {test.index[0]}, not after the end of "
                               f"{Path(data.source).name} ({source.index[-1]}); test data must come later")
        parts["test"] = test = fill_gaps(test, step, data, data.test)
    need = win.input + win.horizon
    for split, part in parts.items():
        if len(part) < need:
            where = data.test if split == "test" and data.test is not None else data.source
            raise RatchetError(f"{where}: the {split} part has {len(part)} steps; window.input {win.input} + "
                               f"window.horizon {win.horizon} needs at least {need} "
                               "(a longer series, a shorter window, or larger fractions)")

    offset, scale = fit_scaler(parts["train"].to_numpy(np.float64), cfg.prepare.scaler)
    arrays = {}
    for split, part in parts.items():
        raw = part.to_numpy(np.float64)
        arrays[f"{split}_series"] = ((raw - offset) / scale).astype(np.float32)
        arrays[f"{split}_raw"] = raw.astype(np.float32)
        arrays[f"{split}_time"] = part.index.to_numpy("datetime64[ns]").astype(np.int64)
    meta = {
        "family": "sequence",
        "source": str(data.source),
        "test_source": None if data.test is None else str(data.test),
        "timestamp": data.timestamp,
        "inputs": columns,
        "target": data.target,
        "target_index": columns.index(data.target),
        "frequency": _freq_text(step),
        "window": win.model_dump(),
        "input_shape": [win.input, len(columns)],
        "scaler": cfg.prepare.scaler,
        "offset": offset.tolist(),
        "scale": scale.tolist(),
        "rows": {split: len(part) for split, part in parts.items()},
        "windows": {split: window_count(len(part), win.input, win.horizon, split_stride(split, win.stride))
                    for split, part in parts.items()},
        "span": {split: [str(part.index[0]), str(part.index[-1])] for split, part in parts.items()},
        "cleaning": {"source": source.attrs.get("cleaning", {}),
                     **({"test": test.attrs.get("cleaning", {})} if data.test is not None else {})},
        "serving_input": "test_raw",
    }
    return write_prepared(cfg.prepare.out_dir, arrays, meta)


def read_series(path: Path, data, columns: list[str]) -> pd.DataFrame:
    """The CSV's value `columns` indexed by parsed timestamps, in time order, one row per
    timestamp. Errors name the file, the column and the line."""
    frame = read_csv(path, [data.timestamp, *columns], dtype=str, keep_default_na=False)  # parsed below

    line = pd.RangeIndex(2, len(frame) + 2)  # file line of each row (1 is the header)
    text = frame[data.timestamp].str.strip()
    times = pd.to_datetime(text, errors="coerce")  # the format of the first row, for every row
    bad = times.isna().to_numpy()
    if bad.any():
        i = int(np.argmax(bad))
        raise RatchetError(f"{path}: column '{data.timestamp}', line {line[i]}: {text.iloc[i]!r} is not a timestamp")
    values = {}
    for column in columns:
        cells = frame[column].str.strip()
        empty = cells.isin(MISSING)
        numbers = pd.to_numeric(cells.where(~empty), errors="coerce")
        bad = (numbers.isna() & ~empty).to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            raise RatchetError(f"{path}: column '{column}', line {line[i]}: {cells.iloc[i]!r} is not a number")
        values[column] = numbers.astype(np.float64).to_numpy()
    series = pd.DataFrame(values, index=pd.DatetimeIndex(times, name=data.timestamp).as_unit("ns"))
    cleaning = {"sorted": False, "duplicates": 0}

    if not series.index.is_monotonic_increasing:
        back = np.flatnonzero(np.diff(series.index.asi8) < 0)[0] + 1
        if data.unsorted == "fail":
            raise RatchetError(f"{path}: line {line[back]}: timestamp {series.index[back]} comes before "
                               f"{series.index[back - 1]} on line {line[back - 1]}; rows are not in time order "
                               "(data.unsorted: sort orders them)")
        series = series.sort_index(kind="stable")
        cleaning["sorted"] = True
    repeated = series.index.duplicated(keep="first")
    if repeated.any():
        first = series.index[np.argmax(repeated)]
        if data.duplicates == "fail":
            raise RatchetError(f"{path}: timestamp {first} appears more than once ({int(repeated.sum())} repeated "
                               "rows in all); data.duplicates: first or mean resolves them")
        series = series[~repeated] if data.duplicates == "first" else series.groupby(level=0, sort=True).mean()
        cleaning["duplicates"] = int(repeated.sum())
    series.attrs["cleaning"] = cleaning
    return series


def _step(series: pd.DataFrame, data, path: Path) -> pd.Timedelta:
    """The series' time step: data.frequency, or the most common difference."""
    if data.frequency is not None:
        try:
            step = pd.Timedelta(pd.tseries.frequencies.to_offset(data.frequency))
        except (ValueError, TypeError):
            raise RatchetError(f"data.frequency {data.frequency!r}: not a fixed time step (e.g. 15min, 1h, 1D)") from None
    else:
        if len(series) < 2:
            raise RatchetError(f"{path}: one row is not a series")
        step = pd.Series(np.diff(series.index.asi8)).mode().iloc[0]
        step = pd.Timedelta(int(step), unit="ns")
    if step <= pd.Timedelta(0):
        raise RatchetError(f"data.frequency: the step must be positive (got {step})")
    return step


def fill_gaps(series: pd.DataFrame, step: pd.Timedelta, data, path: Path) -> pd.DataFrame:
    """Every step from the first timestamp to the last, each with a value in every column;
    missing steps and empty values are an error or filled, as `data.gaps` says."""
    offsets = (series.index.asi8 - series.index.asi8[0]) % step.value
    if offsets.any():
        i = int(np.argmax(offsets != 0))
        raise RatchetError(f"{path}: timestamp {series.index[i]} is off the {_freq_text(step)} grid that starts "
                           f"at {series.index[0]} (set data.frequency, or fix the timestamps)")
    full = pd.date_range(series.index[0], series.index[-1], freq=step, name=series.index.name)
    missing_steps = len(full) - len(series)
    empty = {c: int(n) for c, n in series.isna().sum().items() if n}
    cleaning = {**series.attrs.get("cleaning", {}), "filled_steps": missing_steps, "filled_values": sum(empty.values())}
    if missing_steps or empty:
        if data.gaps == "fail":
            if missing_steps:
                diffs = np.diff(series.index.asi8)
                i = int(np.argmax(diffs > step.value))
                raise RatchetError(f"{path}: {missing_steps} missing step(s) of {_freq_text(step)}; the first gap is "
                                   f"after {series.index[i]}, next row {series.index[i + 1]} "
                                   "(data.gaps: ffill or interpolate fills them)")
            column = next(iter(empty))
            at = series.index[series[column].isna().to_numpy()][0]
            raise RatchetError(f"{path}: column '{column}' has {empty[column]} empty value(s), the first at "
                               f"{at} (data.gaps: ffill or interpolate fills them)")
        series = series.reindex(full)
        series = series.ffill() if data.gaps == "ffill" else series.interpolate(method="time")
        series = series.bfill()  # a series that starts with empty values takes its first value
    series.attrs["cleaning"] = cleaning
    return series


def fit_scaler(train: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(offset, scale) per column from the training part: scaled = (raw - offset) / scale."""
    columns = train.shape[1]
    if kind == "standard":
        offset, scale = train.mean(axis=0), train.std(axis=0)
    elif kind == "minmax":
        offset, scale = train.min(axis=0), train.max(axis=0) - train.min(axis=0)
    else:
        offset, scale = np.zeros(columns), np.ones(columns)
    return offset, np.where(scale > 0, scale, 1.0)


def split_stride(split: str, stride: int) -> int:
    """Steps between window starts in `split`: `window.stride` thins the training windows only.
    Validation and test read every window, so their errors cover every step of the split, not
    the one phase of a daily or hourly pattern that windows `stride` apart would all land on."""
    return stride if split == "train" else 1


def window_count(steps: int, input: int, horizon: int, stride: int) -> int:
    """Windows of `input` + `horizon` steps, `stride` apart, that fit in `steps` (0 if none)."""
    return max(0, (steps - input - horizon) // stride + 1)


def _freq_text(step: pd.Timedelta) -> str:
    """'15min', '1h', '1D': the step as pandas writes a frequency, always with its count."""
    text = pd.tseries.frequencies.to_offset(step).freqstr
    return text if text[0].isdigit() else f"1{text}"
