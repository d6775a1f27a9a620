"""The sequence family's data: windows as views, chronological splits, scaling, cleaning, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import load_prepared, ratchet, tiny_params, write_params

from ratchet.config import load_params
from ratchet.families.sequence import FAMILY, series_windows
from ratchet.data.windows import windows
from ratchet.errors import RatchetError
from ratchet.train.distributed import DistInfo
from ratchet.train.loader import BatchLoader

CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def course_windows(series: np.ndarray, target: np.ndarray, input: int, horizon: int, stride: int):
    """Windows built the plain way: one slice per window, copied."""
    xs, ys = [], []
    for start in range(0, len(series) - input - horizon + 1, stride):
        xs.append(series[start : start + input])
        ys.append(target[start + input : start + input + horizon])
    return np.stack(xs), np.stack(ys)


@pytest.mark.parametrize("input,horizon,stride", [(7, 3, 1), (5, 1, 2), (4, 4, 3), (1, 1, 1)])
def test_windows_equal_a_plain_loop_and_are_views_of_the_series(input, horizon, stride):
    series = torch.randn(53, 3)
    x, y = windows(series, series[:, 1], input, horizon, stride)
    want_x, want_y = course_windows(series.numpy(), series[:, 1].numpy(), input, horizon, stride)
    assert len(x) == len(y) == len(want_x)
    everything = torch.arange(len(x))
    assert torch.equal(x.index_select(0, everything), torch.from_numpy(want_x))
    assert torch.equal(y.index_select(0, everything), torch.from_numpy(want_y))
    # views, not copies: the windows share the series' memory and hold O(series) bytes
    assert x.view.untyped_storage().data_ptr() == series.untyped_storage().data_ptr()
    assert x.nbytes == series.nelement() * 4 < x.view.nelement() * 4 or input == 1
    assert torch.equal(x[[2, 0]], torch.from_numpy(want_x[[2, 0]]))


def test_loader_batches_of_windows_equal_the_plain_windows():
    series = torch.randn(200, 2)
    x, y = windows(series, series[:, 0], 24, 3, 1)
    want_x, want_y = course_windows(series.numpy(), series[:, 0].numpy(), 24, 3, 1)
    loader = BatchLoader([x, y], 16, CPU, train=False)
    got = [(bx, by) for bx, by in loader]
    assert torch.equal(torch.cat([b[0] for b in got]), torch.from_numpy(want_x))
    assert torch.equal(torch.cat([b[1] for b in got]), torch.from_numpy(want_y))
    streamed = BatchLoader([x, y], 16, CPU, train=False, preload_bytes=0)  # the disk path
    assert streamed.streaming
    assert torch.equal(torch.cat([b[0] for b in streamed]), torch.from_numpy(want_x))


def _counting_series(path, steps=200, start="2024-01-01", freq="h"):
    """value = the row number: a window's values say exactly which rows it read."""
    pd.DataFrame({"timestamp": pd.date_range(start, periods=steps, freq=freq), "value": np.arange(steps),
                  "temp": np.arange(steps) * 2.0}).to_csv(path, index=False)
    return path


def _section(project, **changes):
    params = tiny_params()
    for dotted, value in changes.items():
        node = params["pipelines"]["sequence"]
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    write_params(project, params)
    return load_params(project / "params.yaml").pipeline("sequence")


def test_targets_stay_in_their_split_whose_windows_read_context_from_before_it(project):
    """Every step of the validation and test parts is forecast: their first windows read their
    inputs from the end of the part before; no target lies outside its part."""
    _counting_series(project / "data/raw/series.csv")
    cfg = _section(project, **{"prepare.scaler": "none", "window.input": 10, "window.horizon": 4,
                               "evaluate.seasonal_period": None})
    meta = FAMILY.prepare(cfg, project)
    prepared = load_prepared(cfg.prepare.out_dir)
    assert meta.rows == {"train": 120, "val": 40, "test": 40}
    assert meta.context == {"train": 0, "val": 10, "test": 10}
    bounds = {"train": (0, 119), "val": (120, 159), "test": (160, 199)}
    for split, (low, high) in bounds.items():
        x, y = series_windows(prepared, split, raw=True)
        everything = torch.arange(len(x))
        inputs, targets = x.index_select(0, everything)[..., 0], y.index_select(0, everything)
        first_input = low - meta.context[split]
        assert inputs.min() == first_input and targets.max() == high
        assert ((inputs >= first_input) & (inputs < high - 3)).all() and ((targets >= low) & (targets <= high)).all()
        first_targets = targets[:, 0].long().tolist()
        if split == "train":
            assert first_targets == list(range(10, 120 - 4 + 1))
            assert len(x) == meta.windows[split] == 120 - 10 - 4 + 1
        else:  # every step of the part is a target: each one starts a window's horizon
            assert first_targets == list(range(low, high - 4 + 2))
            assert set(targets.long().flatten().tolist()) == set(range(low, high + 1))
            assert len(x) == meta.windows[split] == 40 - 4 + 1
        times = prepared.array(f"{split}_time")
        assert pd.Timestamp(int(times[0])) == pd.Timestamp("2024-01-01") + pd.Timedelta(hours=first_input)
        assert meta.span[split][0] == str(pd.Timestamp("2024-01-01") + pd.Timedelta(hours=low))


def test_stride_thins_the_training_windows_only(project):
    """Windows `stride` apart would all forecast the same phase of a daily pattern: validation and
    test read every window, so their errors cover every step."""
    _counting_series(project / "data/raw/series.csv")
    cfg = _section(project, **{"prepare.scaler": "none", "window.input": 10, "window.horizon": 4,
                               "window.stride": 3, "evaluate.seasonal_period": None})
    meta = FAMILY.prepare(cfg, project)
    prepared = load_prepared(cfg.prepare.out_dir)
    starts = {}
    for split in ("train", "val", "test"):
        x, _ = series_windows(prepared, split, raw=True)
        starts[split] = x.index_select(0, torch.arange(len(x)))[:, 0, 0].long().tolist()
        assert len(x) == meta.windows[split]
    assert starts["train"] == list(range(0, 120 - 14 + 1, 3))
    assert starts["val"] == list(range(110, 160 - 14 + 1)) and starts["test"] == list(range(150, 200 - 14 + 1))


def test_scaling_is_fitted_on_the_training_part_and_inverts_exactly(project):
    cfg = _section(project)
    meta = FAMILY.prepare(cfg, project)
    prepared = load_prepared(cfg.prepare.out_dir)
    raw = pd.read_csv(project / "data/raw/series.csv")[["value", "temp"]].to_numpy()
    train = raw[: meta.rows["train"]]
    assert np.allclose(meta.offset, train.mean(axis=0)) and np.allclose(meta.scale, train.std(axis=0))
    assert not np.allclose(meta.offset, raw.mean(axis=0))  # later data did not leak into the scaling
    for split in ("train", "val", "test"):
        scaled, original = prepared.array(f"{split}_series"), prepared.array(f"{split}_raw")
        back = scaled.astype(np.float64) * meta.scale + meta.offset
        np.testing.assert_allclose(back, original, rtol=1e-6, atol=1e-5)
    # the registered model's own scaling: raw windows in, forecasts in original units out
    torch.manual_seed(0)
    net = FAMILY.build_model(cfg.model, meta)
    served = FAMILY.serving_model(cfg, net, meta)
    x_raw, _ = series_windows(prepared, "test", raw=True)
    x_scaled, _ = series_windows(prepared, "test", raw=False)
    idx = torch.arange(5)
    with torch.no_grad():
        want = net.eval()(x_scaled.index_select(0, idx)) * meta.scale[0] + meta.offset[0]
        torch.testing.assert_close(served(x_raw.index_select(0, idx)), want, rtol=1e-5, atol=1e-4)


SHORT = {"window.input": 4, "window.horizon": 1, "evaluate.seasonal_period": None}  # for 100-step series


def _write(path, rows):
    path.write_text("timestamp,value,temp\n" + "".join(f"{t},{v},{v}\n" for t, v in rows))
    return path


def _hours(n, start=0):
    return [(str(pd.Timestamp("2024-01-01") + pd.Timedelta(hours=h)), float(h)) for h in range(start, start + n)]


BAD_SERIES = {
    "duplicate": (lambda: _hours(100)[:50] + [_hours(100)[49]] + _hours(100)[50:], {},
                  "timestamp 2024-01-03 01:00:00 appears more than once"),
    "gap": (lambda: _hours(40) + _hours(60, start=45), {}, "5 missing step(s) of 1h; the first gap is after "
            "2024-01-02 15:00:00"),
    "empty value": (lambda: _hours(30) + [(_hours(31)[30][0], "")] + _hours(69, start=31), {},
                    "column 'value' has 1 empty value(s), the first at 2024-01-02 06:00:00"),
    "too short": (lambda: _hours(40), {}, "the train part has 24 steps; window.input 24 + window.horizon 3 "
                  "needs at least 27"),
    "not in time order": (lambda: _hours(50) + [_hours(60)[55]] + _hours(100, start=50)[:5] + _hours(100)[56:],
                          {"data.unsorted": "fail"}, "line 53: timestamp 2024-01-03 02:00:00 comes before "
                          "2024-01-03 07:00:00 on line 52; rows are not in time order"),
    "not a timestamp": (lambda: _hours(10) + [("yesterday", 1.0)] + _hours(90, start=11), {},
                        "column 'timestamp', line 12: 'yesterday' is not a timestamp"),
    "not a number": (lambda: _hours(10) + [(_hours(11)[10][0], "n/a?")] + _hours(89, start=11), {},
                     "column 'value', line 12: 'n/a?' is not a number"),
}


@pytest.mark.parametrize("case", list(BAD_SERIES))
def test_bad_series_fail_with_one_clear_line_and_no_outputs(project, case):
    rows, changes, message = BAD_SERIES[case]
    _write(project / "data/raw/series.csv", rows())
    cfg = _section(project, **changes)
    with pytest.raises(RatchetError) as info:
        FAMILY.prepare(cfg, project)
    assert str(info.value).startswith(f"{project / 'data/raw/series.csv'}: ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert not cfg.prepare.out_dir.parent.exists()  # not even the directory it would go in


def test_the_command_line_says_error_and_exits_2_on_a_bad_series(project):
    _write(project / "data/raw/series.csv", _hours(40) + _hours(60, start=45))
    proc = ratchet(project, "prepare", "sequence", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {project / 'data/raw/series.csv'}: 5 missing step(s) of 1h; the first gap is after "
        "2024-01-02 15:00:00, next row 2024-01-02 21:00:00 (data.gaps: ffill or interpolate fills them)"]


def test_gaps_and_duplicates_are_filled_as_params_say(project):
    rows = _hours(40) + _hours(60, start=44)  # 40..43 missing
    rows.insert(11, (rows[10][0], 99.0))  # a repeated timestamp, after the first, another value
    _write(project / "data/raw/series.csv", rows)
    source = project / "data/raw/series.csv"
    for gaps, want in (("ffill", [39.0, 39.0, 39.0, 39.0]), ("interpolate", [40.0, 41.0, 42.0, 43.0])):
        for duplicates, at_ten in (("first", 10.0), ("mean", (10.0 + 99.0) / 2)):
            cfg = _section(project, **{"data.gaps": gaps, "data.duplicates": duplicates, "prepare.scaler": "none",
                                       "prepare.val_fraction": 0.1, "prepare.test_fraction": 0.1, **SHORT})
            meta = FAMILY.prepare(cfg, project)
            train = load_prepared(cfg.prepare.out_dir).array("train_raw")[:, 0]
            assert list(train[40:44]) == want and train[10] == at_ten, (gaps, duplicates)
            assert meta.cleaning["train"] == {"sorted": False, "duplicates": 1, "non_finite": 0,
                                                 "filled_steps": 4, "filled_values": 0}
            assert meta.source == "data/raw/series.csv"  # as params.yaml writes it: relative to the project


def test_unsorted_rows_are_sorted_by_default(project):
    rows = _hours(100)
    rows[20], rows[21] = rows[21], rows[20]
    _write(project / "data/raw/series.csv", rows)
    cfg = _section(project, **{"prepare.scaler": "none", **SHORT})
    meta = FAMILY.prepare(cfg, project)
    assert meta.cleaning["train"]["sorted"] is True
    assert list(load_prepared(cfg.prepare.out_dir).array("train_raw")[18:23, 0]) == [18, 19, 20, 21, 22]


def test_separate_test_file_must_come_after_the_training_file(project):
    _counting_series(project / "data/raw/series.csv", steps=150)
    _counting_series(project / "data/raw/later.csv", steps=60, start="2024-01-07 06:00")
    cfg = _section(project, **{"data.source": "data/raw", "data.train": "series.csv", "data.test": "later.csv",
                               "prepare.scaler": "none"})
    meta = FAMILY.prepare(cfg, project)
    assert meta.rows == {"train": 120, "val": 30, "test": 60}  # validation: the end of the training file
    assert meta.span["test"][0] == "2024-01-07 06:00:00"
    assert meta.context["test"] == 24  # the next step after the training file: its inputs start there
    x, y = series_windows(load_prepared(cfg.prepare.out_dir), "test", raw=True)
    assert x[[0]][0, 0, 0] == 150 - 24 and y[[0]][0, 0] == 0 and len(x) == 60 - 3 + 1
    _counting_series(project / "data/raw/later.csv", steps=60, start="2024-01-08 06:00")  # a day later: no context
    meta = FAMILY.prepare(cfg, project)
    assert meta.context["test"] == 0 and meta.windows["test"] == 60 - 24 - 3 + 1
    _counting_series(project / "data/raw/later.csv", steps=60, start="2024-01-07 05:00")
    with pytest.raises(RatchetError, match=r"later.csv: the test part starts at 2024-01-07 05:00:00, not after the "
                                           r"end of the part before it \(2024-01-07 05:00:00\); test data must "
                                           r"come later"):
        FAMILY.prepare(cfg, project)


@pytest.mark.parametrize("change,message", [
    ({"evaluate.seasonal_period": 48}, "pipelines.sequence: evaluate.seasonal_period 48 is longer than window.input 24"),
    ({"promote.metric": "f1_macro", "promote.direction": "maximize"},
     "pipelines.sequence.promote.metric: this family computes mse, mae, rmse (got 'f1_macro')"),
    ({"promote.direction": "maximize"}, "pipelines.sequence.promote.direction: rmse is lower-is-better; set minimize"),
    ({"train.monitor": "val_accuracy"},
     "pipelines.sequence.train.monitor: this family computes val_loss, val_mae, val_rmse (got 'val_accuracy')"),
    ({"data.features": ["temp"]}, "pipelines.sequence: data.features: must include the target value"),
    ({"window.horizon": 0}, "pipelines.sequence.window.horizon: must be greater than or equal to 1 (got 0)"),
    ({"model.name": "transformer"}, "pipelines.sequence.model: "),
    ({"model.hidden": "big"}, "pipelines.sequence.model.hidden: must be a valid integer"),
])
def test_bad_sequence_params_name_the_key(project, change, message):
    _section_raw = tiny_params()
    for dotted, value in change.items():
        node = _section_raw["pipelines"]["sequence"]
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    write_params(project, _section_raw)
    with pytest.raises(RatchetError) as info:
        load_params(project / "params.yaml")
    assert str(info.value).startswith(f"params.yaml: {message}")


@pytest.mark.parametrize("name,bidirectional,layers", [("rnn", False, 1), ("lstm", True, 2), ("gru", False, 3)])
def test_recurrent_models_forecast_every_horizon_step(project, name, bidirectional, layers):
    cfg = _section(project, **{"model.name": name, "model.bidirectional": bidirectional, "model.layers": layers,
                               "model.dropout": 0.1})
    meta = FAMILY.prepare(cfg, project)
    net = FAMILY.build_model(cfg.model, meta)
    x, _ = series_windows(load_prepared(cfg.prepare.out_dir), "train", raw=False)
    out = net(x.index_select(0, torch.arange(5)))
    assert out.shape == (5, 3)
    assert net.rnn.num_layers == layers and net.rnn.bidirectional == bidirectional


def test_residual_forecaster_starts_at_the_naive_forecast_and_learns_corrections(project):
    cfg = _section(project, **{"data.features": ["temp", "value"], "model.residual": True})
    meta = FAMILY.prepare(cfg, project)
    assert meta.target_index == 1
    torch.manual_seed(0)
    net = FAMILY.build_model(cfg.model, meta)
    x, y = series_windows(load_prepared(cfg.prepare.out_dir), "train", raw=False)
    batch, target = x.index_select(0, torch.arange(32)), y.index_select(0, torch.arange(32))
    naive = batch[:, -1, 1:2].expand(-1, 3)  # the last scaled target value, every horizon step
    assert torch.equal(net(batch), naive)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(20):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(net(batch), target)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert torch.nn.functional.mse_loss(net(batch), target) < torch.nn.functional.mse_loss(naive, target)
    plain = FAMILY.build_model(_section(project, **{"data.features": ["temp", "value"]}).model, meta)
    assert not torch.allclose(plain(batch), naive)


def test_fine_tuning_refuses_a_forecaster_trained_with_the_other_residual_setting(project):
    from ratchet.errors import RatchetError
    from ratchet.models.finetune import load_initial_weights

    cfg = _section(project, **{"model.residual": True})
    meta = FAMILY.prepare(cfg, project)
    level = FAMILY.build_model(_section(project).model, meta)
    torch.save({"config": {"model": {"name": "gru", "residual": False}}, "model": level.state_dict()},
               project / "level.pt")
    with pytest.raises(RatchetError, match=r"level.pt: it was trained with model.residual false; "
                                           r"model.residual is true"):
        load_initial_weights(FAMILY.build_model(cfg.model, meta), "level.pt", "gru", project,
                             check=lambda saved: FAMILY.check_init_from(saved, cfg, "level.pt"))
    same = FAMILY.build_model(_section(project).model, meta)
    assert load_initial_weights(same, "level.pt", "gru", project) == []  # same setting: every weight copied


def test_demo_series_prepares_with_the_shipped_params(tmp_path):
    from ratchet.data.demo import write_load_series

    write_load_series(tmp_path / "load.csv")
    frame = pd.read_csv(tmp_path / "load.csv", parse_dates=["timestamp"])
    assert len(frame) == 120 * 24 and frame["timestamp"].diff().dropna().eq(pd.Timedelta(hours=1)).all()
    hourly = frame.groupby(frame["timestamp"].dt.hour)["load"].mean()
    assert hourly.idxmax() in range(17, 22) and hourly.max() - hourly.min() > 15  # the daily cycle is there
