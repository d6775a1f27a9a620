"""Prepare a time-series CSV: parse and order the timestamps, find the time grid (a fixed step
or a calendar frequency such as month starts), deal with repeated and missing steps, split
chronologically, fit the scaling on the training part only.

Writes, per split (train, val, test): `<split>_series.npy` (the input columns scaled, float32,
T x F), `<split>_raw.npy` (the same in original units: what the registered model takes and
what forecasts are scored against) and `<split>_time.npy` (timestamps, int64 ns). Windows are
not stored: train and evaluate take them as views of these series (ratchet.data.windows).

A validation or test part reads its first windows' inputs from the steps before it (the end of
the preceding part, when the two are contiguous on the grid): those `context[split]` steps
lead its arrays, so every step of the part is a forecast target and no target lies outside it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.tseries.frequencies import to_offset

from ratchet.data.prepared import project_path, read_csv, row_keys, write_prepared
from ratchet.errors import RatchetError

SPLITS = ("train", "val", "test")
MISSING = ["", "NA", "NaN", "nan", "null"]  # an empty value, filled or refused as data.gaps says
MAX_GRID = 100  # a frequency may add at most this many grid steps per row (a typo such as 1s on daily data)


def prepare(cfg, root: Path) -> dict:
    """Validate, split, scale and write the series and its windows' record; return meta.json's
    content (its paths relative to the project folder `root`)."""
    data, win = cfg.data, cfg.window
    columns = data.inputs
    files = {split: data.file(split) for split in SPLITS}
    source = read_series(files["train"], data, columns)
    offset = grid_offset(source, data, files["train"])
    source = fill_gaps(source, offset, data, files["train"])
    read = {"train": source}
    for split in ("val", "test"):
        if files[split]:
            read[split] = fill_gaps(read_series(files[split], data, columns), offset, data, files[split])
    n = len(source)
    n_test = 0 if files["test"] else round(n * cfg.prepare.test_fraction)
    n_val = 0 if files["val"] else round(n * cfg.prepare.val_fraction)
    parts = {"train": source.iloc[: n - n_val - n_test],
             "val": read.get("val", source.iloc[n - n_val - n_test : n - n_test]),
             "test": read.get("test", source.iloc[n - n_test :])}
    where = {split: files[split] or files["train"] for split in SPLITS}

    context, history = {"train": 0}, parts["train"]  # history: the contiguous steps before a part
    for split in ("val", "test"):
        part = parts[split]
        if len(part) == 0:
            raise RatchetError(f"{where[split]}: the {split} part is empty (a larger prepare.{split}_fraction)")
        if part.index[0] <= history.index[-1]:
            raise RatchetError(f"{where[split]}: the {split} part starts at {part.index[0]}, not after the end of "
                               f"the part before it ({history.index[-1]}); {split} data must come later")
        if part.index[0] == history.index[-1] + offset:
            context[split] = min(win.input, len(history))
            history = pd.concat([history, part])
        else:  # a gap between the files: the part's windows start inside it
            context[split], history = 0, part
    need = win.input + win.horizon
    for split, part in parts.items():
        if context[split] + len(part) < need:
            raise RatchetError(f"{where[split]}: the {split} part has {len(part)} steps"
                               + (f" (and {context[split]} before it)" if context[split] else "")
                               + f"; window.input {win.input} + window.horizon {win.horizon} needs at least {need} "
                               "(a longer series, a shorter window, or larger fractions)")

    offset_, scale = fit_scaler(parts["train"].to_numpy(np.float64), cfg.prepare.scaler)
    arrays = {}
    previous = None
    for split in SPLITS:
        part = parts[split]
        lead = previous.iloc[len(previous) - context[split]:] if context[split] else part.iloc[:0]
        whole = pd.concat([lead, part])
        raw = whole.to_numpy(np.float64)
        arrays[f"{split}_series"] = ((raw - offset_) / scale).astype(np.float32)
        arrays[f"{split}_raw"] = raw.astype(np.float32)
        arrays[f"{split}_time"] = whole.index.to_numpy("datetime64[ns]").astype(np.int64)
        arrays[f"{split}_keys"] = row_keys(arrays[f"{split}_time"], raw)  # a step: its time and values
        previous = part if previous is None or not context[split] else pd.concat([previous, part])
    meta = {
        "family": "sequence",
        "source": project_path(files["train"], root),
        "test_source": None if files["test"] is None else project_path(files["test"], root),
        "files": {split: project_path(where[split], root) for split in SPLITS},
        "timestamp": data.timestamp,
        "inputs": columns,
        "target": data.target,
        "target_index": columns.index(data.target),
        "frequency": freq_text(offset),
        "window": win.model_dump(),
        "input_shape": [win.input, len(columns)],
        "scaler": cfg.prepare.scaler,
        "offset": offset_.tolist(),
        "scale": scale.tolist(),
        "rows": {split: len(part) for split, part in parts.items()},
        "context": context,
        "windows": {split: window_count(context[split] + len(part), win.input, win.horizon,
                                        split_stride(split, win.stride)) for split, part in parts.items()},
        "span": {split: [str(part.index[0]), str(part.index[-1])] for split, part in parts.items()},
        "cleaning": {split: frame.attrs.get("cleaning", {}) for split, frame in read.items()},
        "serving_input": "test_raw",
    }
    return write_prepared(cfg.prepare.out_dir, arrays, meta)


def read_series(path: Path, data, columns: list[str]) -> pd.DataFrame:
    """The CSV's value `columns` indexed by parsed timestamps, in time order, one row per
    timestamp. Errors name the file, the column and the line."""
    frame = read_csv(path, [data.timestamp, *columns], columns=data.columns, delimiter=data.delimiter, dtype=str,
                     keep_default_na=False)  # parsed below
    first = frame.attrs["first_line"]
    line = pd.RangeIndex(first, len(frame) + first)  # file line of each row
    text = frame[data.timestamp].str.strip()
    times = pd.to_datetime(text, errors="coerce")  # the format of the first row, for every row
    bad = times.isna().to_numpy()
    if bad.any():
        i = int(np.argmax(bad))
        raise RatchetError(f"{path}: column '{data.timestamp}', line {line[i]}: {text.iloc[i]!r} is not a timestamp")
    values = {}
    non_finite = 0
    limit = np.finfo(np.float32).max
    for column in columns:
        cells = frame[column].str.strip()
        empty = cells.isin(MISSING)
        numbers = pd.to_numeric(cells.where(~empty), errors="coerce")
        bad = (numbers.isna() & ~empty).to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            raise RatchetError(f"{path}: column '{column}', line {line[i]}: {cells.iloc[i]!r} is not a number")
        numbers = numbers.to_numpy(dtype=np.float64, copy=True)
        infinite = np.abs(numbers) > limit  # inf, -inf, and what float32 cannot hold (NaN compares False)
        if infinite.any():
            i = int(np.argmax(infinite))
            if data.gaps == "fail":
                raise RatchetError(f"{path}: column '{column}', line {line[i]}: {cells.iloc[i]!r} is not a finite "
                                   f"float32 number ({int(infinite.sum())} such values in the column; data.gaps: "
                                   "ffill or interpolate fills them like empty values)")
            numbers[infinite] = np.nan
            non_finite += int(infinite.sum())
        values[column] = numbers
    series = pd.DataFrame(values, index=pd.DatetimeIndex(times, name=data.timestamp).as_unit("ns"))
    cleaning = {"sorted": False, "duplicates": 0, "non_finite": non_finite}

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


def grid_offset(series: pd.DataFrame, data, path: Path) -> pd.DateOffset:
    """The series' time grid: `data.frequency` (a pandas frequency, fixed or calendar), or the
    grid that holds every timestamp with the fewest missing steps: the most common difference,
    or, for steps of a day or more, a calendar frequency (business days, weeks, month, quarter
    and year starts or ends) anchored at the first timestamp."""
    if data.frequency is not None:
        # M, Q, Y and A (with a count, an anchor): the period ends pandas now spells ME, QE, YE
        alias = re.fullmatch(r"(\d*)([MQYA])(-[A-Z]{3})?", data.frequency.strip())
        text = (f"{alias[1]}{alias[2].replace('A', 'Y')}E{alias[3] or ''}" if alias else data.frequency.strip())
        try:
            offset = to_offset(text)
        except (ValueError, TypeError, KeyError) as exc:
            inner = re.search(r"error message: \w+\((.*)\)$", str(exc).strip("\"'"), re.S)
            hint = (inner[1] if inner else str(exc)).strip("\"' ").splitlines()[0].rstrip(".")
            raise RatchetError(f"data.frequency {data.frequency!r}: not a pandas frequency (e.g. 15min, 1h, 1D, B, "
                               f"W-SUN, MS, ME, QS, YS): {hint}") from None
        if offset.n <= 0:
            raise RatchetError(f"data.frequency {data.frequency!r}: the step must be positive")
        _check_size(series, offset, path)
        return offset
    if len(series) < 2:
        raise RatchetError(f"{path}: one row is not a series")
    index = series.index
    mode = pd.Timedelta(int(pd.Series(np.diff(index.asi8)).mode().iloc[0]), unit="ns")
    candidates = [to_offset(mode)]
    if mode >= pd.Timedelta(days=1):
        first = index[0]
        quarter = "JAN FEB MAR".split()[(first.month - 1) % 3]
        month = first.strftime("%b").upper()
        day = first.strftime("%a").upper()
        candidates += [to_offset(f) for f in ("B", f"W-{day}", "MS", "ME", f"QS-{quarter}", f"QE-{quarter}",
                                               f"YS-{month}", f"YE-{month}")]
    best = None
    for offset in candidates:
        if isinstance(offset, pd.offsets.Tick) and not _small_grid(series, offset):
            continue
        grid = pd.date_range(index[0], index[-1], freq=offset)
        if len(grid) and grid[0] == index[0] and index.isin(grid).all() and (best is None or len(grid) < best[0]):
            best = (len(grid), offset)
    if best is None:
        raise RatchetError(f"{path}: the timestamps follow no single grid (the most common step is "
                           f"{freq_text(to_offset(mode))}, and no calendar frequency holds them all); "
                           "set data.frequency, or fix the timestamps")
    return best[1]


def _small_grid(series: pd.DataFrame, offset) -> bool:
    span = series.index[-1] - series.index[0]
    return span / pd.Timedelta(offset) <= MAX_GRID * len(series) + 1000


def _check_size(series: pd.DataFrame, offset, path: Path) -> None:
    if isinstance(offset, (pd.offsets.Tick, pd.offsets.Day)) and not _small_grid(series, offset):
        steps = int((series.index[-1] - series.index[0]) / pd.Timedelta(offset))
        raise RatchetError(f"{path}: data.frequency {freq_text(offset)} makes {steps:,} steps for "
                           f"{len(series):,} rows; is it the series' step?")


def fill_gaps(series: pd.DataFrame, offset, data, path: Path) -> pd.DataFrame:
    """Every step of the grid from the first timestamp to the last, each with a value in every
    column; missing steps and empty values are an error or filled, as `data.gaps` says."""
    full = pd.date_range(series.index[0], series.index[-1], freq=offset, name=series.index.name).as_unit("ns")
    position = full.get_indexer(series.index)
    if len(full) == 0 or full[0] != series.index[0] or (position < 0).any():
        i = int(np.argmax(position < 0)) if len(full) and full[0] == series.index[0] else 0
        raise RatchetError(f"{path}: timestamp {series.index[i]} is off the {freq_text(offset)} grid that starts "
                           f"at {full[0] if len(full) else series.index[0]} (set data.frequency, or fix the "
                           "timestamps)")
    missing_steps = len(full) - len(series)
    empty = {c: int(n) for c, n in series.isna().sum().items() if n}
    cleaning = {**series.attrs.get("cleaning", {}), "filled_steps": missing_steps, "filled_values": sum(empty.values())}
    if missing_steps or empty:
        if data.gaps == "fail":
            if missing_steps:
                i = int(np.argmax(np.diff(position) > 1))
                raise RatchetError(f"{path}: {missing_steps} missing step(s) of {freq_text(offset)}; the first gap "
                                   f"is after {series.index[i]}, next row {series.index[i + 1]} "
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


def freq_text(offset) -> str:
    """'15min', '1h', '1D', '1MS', '1QS-JAN': the grid as pandas writes a frequency, always with
    its count (pandas reads it back)."""
    text = to_offset(offset).freqstr
    return text if text[0].isdigit() else f"1{text}"
