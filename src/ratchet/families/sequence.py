"""The sequence family: a time-series CSV -> RNN / LSTM / GRU forecasters on sliding windows.

Prepare (data/sequence.py) cleans the series on its time grid, splits it chronologically and
scales it with training statistics. Windows are views over the series (data/windows.py).
Errors are reported in original units beside the naive and seasonal-naive baselines
(evaluate/forecast.py); lower is better. The served model takes raw windows
(N, input steps, features) and returns the forecast (N, horizon) in the target's units.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ratchet.config.sequence import SequencePipeline
from ratchet.errors import RatchetError
from ratchet.families.base import Family, PreparedMeta

METRICS = ("mse", "mae", "rmse")


class SequenceMeta(PreparedMeta):
    test_source: str | None
    files: dict[str, str]  # the CSV each split's steps come from
    timestamp: str
    inputs: list[str]
    target: str
    target_index: int
    frequency: str
    window: dict[str, int]  # input, horizon, stride (steps)
    scaler: str
    offset: list[float]
    scale: list[float]
    windows: dict[str, int]
    context: dict[str, int]  # steps before a split that lead its arrays (inputs of its first windows)
    span: dict[str, list[str]]
    cleaning: dict


class SequenceFamily(Family):
    name = "sequence"
    schema = SequencePipeline
    Meta = SequenceMeta
    monitors = ("val_loss", "val_mae", "val_rmse")  # scaled units
    gate_metrics = METRICS  # original units

    def prepare(self, cfg: SequencePipeline, root: Path) -> SequenceMeta:
        from ratchet.data.sequence import prepare

        return SequenceMeta.model_validate(prepare(cfg, root))

    def describe(self, meta: SequenceMeta) -> str:
        return (f"{', '.join(f'{s} {n}' for s, n in meta.windows.items())} windows of "
                f"{meta.window['input']} -> {meta.window['horizon']} steps every {meta.frequency}")

    def samples(self, cfg, prepared, split: str) -> tuple:
        return series_windows(prepared, split, raw=False)

    def sample_weights(self, cfg, prepared):
        return None  # every training sample once per epoch

    def transforms(self, cfg, meta, device):
        return None, None  # prepare wrote scaled series

    def memory_format(self, meta):
        import torch

        return torch.contiguous_format

    def build_model(self, model_cfg, meta: SequenceMeta):
        from ratchet.models.rnn import Forecaster

        return Forecaster(meta.input_shape[1], meta.window["horizon"], model_cfg, meta.target_index)

    def objective(self, cfg, meta, device):
        from torch import nn
        from ratchet.lazy_imports import defer_torchmetrics

        defer_torchmetrics()
        from torchmetrics.collections import MetricCollection
        from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError

        metrics = MetricCollection({"mae": MeanAbsoluteError(), "rmse": MeanSquaredError(squared=False)})
        return nn.MSELoss(), metrics.to(device)

    def on_train_start(self, cfg, prepared) -> None:
        pass  # forecast.png at evaluation shows the data

    def check_init_from(self, saved_model_cfg: dict, cfg: SequencePipeline, source: str) -> None:
        """The head reads as levels, or as changes from the last value: the weights of one would
        load into the other and forecast nonsense."""
        saved = bool(saved_model_cfg.get("residual", False))
        if saved != cfg.model.residual:
            raise RatchetError(f"train.init_from {source}: it was trained with model.residual {str(saved).lower()}; "
                               f"model.residual is {str(cfg.model.residual).lower()} "
                               "(its head would be read as the other kind of forecast)")

    def evaluate(self, cfg: SequencePipeline, prepared, net, dist) -> tuple[dict, list[tuple]]:
        import torch

        from ratchet.evaluate.forecast import ForecastErrors
        from ratchet.train.distributed import all_gather_objects, all_reduce_sum
        from ratchet.train.loader import BatchLoader

        meta = prepared.meta
        inputs, _ = series_windows(prepared, "test", raw=False)
        raw_inputs, actual = series_windows(prepared, "test", raw=True)
        loader = BatchLoader([inputs, raw_inputs, actual], cfg.evaluate.batch_size, dist, train=False)
        t = meta.target_index
        errors = ForecastErrors(meta.window["horizon"], t, meta.offset[t], meta.scale[t],
                                cfg.evaluate.seasonal_period, dist.device)
        local: list[tuple] = []
        with torch.no_grad():
            for idx, (x, x_raw, y) in loader.iter_with_indices():
                predicted = errors.forecasts(net(x).float(), x_raw)
                errors.update(predicted, y)
                firsts = [predicted[name][:, 0].tolist() for name in errors.names]
                local += zip(idx.tolist(), *firsts)
        errors.sums = all_reduce_sum(errors.sums)
        errors.count = all_reduce_sum(errors.count)
        predictions = sorted(p for part in all_gather_objects(local) for p in part)
        return errors.compute(), predictions

    def write_report(self, name: str, cfg: SequencePipeline, prepared, metrics: dict, predictions: list[tuple],
                     out: Path) -> None:
        """The report, and every window's next-step forecast beside the actual value and baselines."""
        import pandas as pd

        from ratchet.data.sequence import split_stride
        from ratchet.evaluate.forecast import report_text
        from ratchet.evaluate.plots import forecast_png

        meta = prepared.meta
        (out / "forecast_report.txt").write_text(report_text(metrics, meta.target))
        times, raw = prepared.array("test_time"), prepared.array("test_raw")
        w, t = meta.window, meta.target_index
        names = ["predicted", "naive"] + (["seasonal_naive"] if cfg.evaluate.seasonal_period else [])
        header = [meta.timestamp, "actual", *names]
        rows = []
        for i, *values in predictions:
            step = i * split_stride("test", w["stride"]) + w["input"]  # the first forecast step of window i
            rows.append([str(pd.Timestamp(int(times[step]))), *(float(f"{v:.6g}") for v in (raw[step, t], *values))])
        for path, part in (("predictions.csv", rows), ("forecast.csv", rows[: cfg.evaluate.plot_steps])):
            with open(out / path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(header)
                writer.writerows(part)
        forecast_png(header, rows[: cfg.evaluate.plot_steps], out / "forecast.png",
                     f"{name}: next-step forecast of {meta.target} vs actual (test)")

    def summary(self, metrics: dict) -> str:
        line = f"rmse {metrics['rmse']:.4g}, mae {metrics['mae']:.4g} (naive {metrics['naive_rmse']:.4g}"
        if "seasonal_naive_rmse" in metrics:
            line += f", seasonal naive {metrics['seasonal_naive_rmse']:.4g}"
        return line + f") on {metrics['windows']} test windows"

    def serving_model(self, cfg, net, meta: SequenceMeta):
        from torch import nn

        from ratchet.models.serving import Scale

        t = meta.target_index
        return nn.Sequential(Scale(meta.offset, meta.scale), net, Scale(meta.offset[t], meta.scale[t], inverse=True)).eval()

    def example_input(self, cfg, meta: SequenceMeta):
        """The training mean, and one scale above it."""
        import numpy as np

        offset, scale = np.array(meta.offset), np.array(meta.scale)
        return np.stack([np.broadcast_to(v, meta.input_shape) for v in (offset, offset + scale)]).astype(np.float32)

    def input_description(self, cfg, meta: SequenceMeta) -> str:
        steps, features = meta.input_shape
        return (f"windows: float32 {steps}x{features} ({', '.join(meta.inputs)}) every {meta.frequency}; "
                f"forecast: {meta.window['horizon']} steps of {meta.target}")

    def serving_spec(self, cfg, meta: SequenceMeta) -> dict:
        return {"timestamp": meta.timestamp, "inputs": meta.inputs, "target": meta.target,
                "frequency": meta.frequency, "window": meta.window, "delimiter": cfg.data.delimiter}

    def serving_signature(self, spec: dict) -> tuple:
        """In: the series' rows (timestamp text, input values); out: `step` 1..horizon, its
        timestamp and the target's forecast."""
        from mlflow.types import ColSpec, Schema

        return (Schema([ColSpec("string", spec["timestamp"]), *(ColSpec("double", c) for c in spec["inputs"])]),
                Schema([ColSpec("long", "step"), ColSpec("string", spec["timestamp"]), ColSpec("double", spec["target"])]))

    def serving_example(self, spec: dict, cfg, meta: SequenceMeta):
        """The last `window.input` steps of the training span, at the training mean."""
        import pandas as pd

        (window, _) = self.example_input(cfg, meta)
        times = pd.date_range(end=meta.span["train"][1], periods=len(window), freq=meta.frequency)
        return pd.DataFrame({spec["timestamp"]: times.astype(str), **{c: window[:, j].astype("float64")
                                                                     for j, c in enumerate(spec["inputs"])}})

    def frame_inputs(self, spec: dict, frame) -> tuple:
        """The window of the last `window.input` rows (after sorting by time): consecutive steps
        of the training frequency, every value present."""
        from ratchet.serve.frames import numbers

        frame = _last_window(spec, frame)
        return (numbers(frame, spec["inputs"], allow_missing=False)[None],)

    def frame_outputs(self, spec: dict, outputs, frame):
        import pandas as pd

        last = _last_window(spec, frame)[spec["timestamp"]].iloc[-1]
        horizon = outputs.shape[1]
        times = pd.date_range(start=last, periods=horizon + 1, freq=spec["frequency"])[1:]
        return pd.DataFrame({"step": range(1, horizon + 1), spec["timestamp"]: times.astype(str),
                             spec["target"]: outputs[0].astype("float64")})

    def read_input(self, spec: dict, path):
        """A series CSV (the training columns by name, others ignored); the forecast follows its
        last row."""
        import pandas as pd

        from ratchet.data.prepared import read_csv

        columns = [spec["timestamp"], *spec["inputs"]]
        frame = read_csv(path, columns, delimiter=spec.get("delimiter", ","), dtype=str, keep_default_na=False)
        frame.index = pd.RangeIndex(frame.attrs["first_line"], frame.attrs["first_line"] + len(frame), name="line")
        ignored = [str(c) for c in frame.columns if c not in columns]
        return frame[columns], [f"ignored columns (not model inputs): {', '.join(ignored)}"] if ignored else []

    def gate_data(self, cfg, prepared) -> tuple:
        return series_windows(prepared, "test", raw=True)

    def sample_keys(self, cfg, prepared, split: str):
        """A window's keys are those of its target steps (time and values): a test window is left
        out when a model was trained to forecast any of them. Inputs read from before a part
        are context, not training targets."""
        import numpy as np

        from ratchet.data.sequence import split_stride

        keys, w = np.asarray(prepared.array(f"{split}_keys")), prepared.meta.window
        stride = split_stride(split, w["stride"])
        starts = w["input"] + stride * np.arange(prepared.meta.windows[split])
        return keys[starts[:, None] + np.arange(w["horizon"])]

    def score(self, cfg, model, meta, x, y, metric: str) -> float:
        """Errors summed in float64, as the evaluate stage does."""
        import torch
        from ratchet.lazy_imports import defer_torchmetrics

        defer_torchmetrics()
        from torchmetrics.collections import MetricCollection
        from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError

        from ratchet.train.batch import chunks

        metrics = MetricCollection({"mse": MeanSquaredError(), "mae": MeanAbsoluteError(),
                                    "rmse": MeanSquaredError(squared=False)})
        metrics.set_dtype(torch.float64)
        for inputs, target in chunks(x, y):
            metrics.update(model(inputs).double(), target.double())
        return float(metrics.compute()[metric])


def series_windows(prepared, split: str, raw: bool) -> tuple:
    """(inputs, targets) windows of a split (views, see data.windows), scaled or in original
    units with `raw`; `window.stride` apart in training, every window in validation and test."""
    import numpy as np

    from ratchet.data.sequence import split_stride
    from ratchet.data.windows import windows

    meta = prepared.meta
    series = np.array(prepared.array(f"{split}_raw" if raw else f"{split}_series"))
    w = meta.window
    return windows(series, series[:, meta.target_index].copy(), w["input"], w["horizon"], split_stride(split, w["stride"]))


def _last_window(spec: dict, frame):
    """The rows of the window a forecast reads: the last `window.input` by time, which must be
    consecutive steps of the frequency the model was trained on."""
    import pandas as pd

    column, steps = spec["timestamp"], spec["window"]["input"]
    if column not in frame.columns:
        raise RatchetError(f"column '{column}' not found (the timestamps)")
    times = pd.to_datetime(frame[column].astype(str).str.strip(), errors="coerce")
    if times.isna().any():
        i = int(times.isna().to_numpy().argmax())
        raise RatchetError(f"column '{column}', {frame.index.name or 'row'} {frame.index[i]}: "
                           f"{frame[column].iloc[i]!r} is not a timestamp")
    if len(frame) < steps:
        raise RatchetError(f"{len(frame)} rows: the model reads the last {steps} steps of the series")
    order = times.argsort(kind="stable").to_numpy()[-steps:]
    window, at = frame.iloc[order].copy(), pd.DatetimeIndex(times.iloc[order])
    expected = pd.date_range(end=at[-1], periods=steps, freq=spec["frequency"])
    if not at.equals(expected):
        i = int((at != expected).argmax())
        raise RatchetError(f"column '{column}': the last {steps} rows are not consecutive {spec['frequency']} steps "
                           f"({at[i]} where {expected[i]} was expected; fill gaps first)")
    window[column] = at
    return window


FAMILY = SequenceFamily()
