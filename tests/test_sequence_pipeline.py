"""The sequence family through train, evaluate and promote: errors in original units beside naive
baselines, the lower-is-better gate, DDP evaluation, the served model."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, dvc, load_prepared, make_series, mlflow_client, ratchet, tiny_params, write_params

from ratchet.families.sequence import series_windows

WINDOW, HORIZON, PERIOD = 24, 3, 24


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny sequence project trained, evaluated and promoted once (GRU; every 2nd training
    window, every test window)."""
    from ratchet.cli import main

    project = tmp_path_factory.mktemp("sequence")
    make_series(project / "data/raw/series.csv")
    write_params(project, tiny_params(**{"sequence.train.epochs": 8, "sequence.window.stride": 2}))
    for stage in ("prepare", "train", "evaluate", "promote"):  # in-process: no start-up per stage
        assert main([stage, "sequence", "--params", str(project / "params.yaml")]) == 0
    return project


def _by_hand(project: Path) -> dict:
    """Baseline errors computed from the CSV directly with pandas: the last 20% is the test part,
    every step of it a target; the first windows read their inputs from before it."""
    values = pd.read_csv(project / "data/raw/series.csv")["value"].to_numpy()
    first = len(values) - round(len(values) * 0.2)
    errors = {"naive": [], "seasonal_naive": []}
    for t in range(first, len(values) - HORIZON + 1):
        history, actual = values[t - WINDOW : t], values[t : t + HORIZON]
        errors["naive"].append(actual - history[-1])
        errors["seasonal_naive"].append(actual - history[WINDOW - PERIOD : WINDOW - PERIOD + HORIZON])
    return {name: np.array(e) for name, e in errors.items()}


def test_errors_are_in_original_units_beside_the_naive_baselines(trained):
    metrics = json.loads((trained / "reports/sequence/metrics.json").read_text())
    hand = _by_hand(trained)
    assert metrics["windows"] == len(hand["naive"]) == 96 - HORIZON + 1
    for name, errors in hand.items():
        assert metrics[f"{name}_mse"] == pytest.approx(float((errors**2).mean()), rel=1e-5)
        assert metrics[f"{name}_mae"] == pytest.approx(float(np.abs(errors).mean()), rel=1e-5)
        assert metrics[f"{name}_rmse"] == pytest.approx(float(np.sqrt((errors**2).mean())), rel=1e-5)
        assert metrics[f"skill_vs_{name}"] == pytest.approx(1 - metrics["mse"] / metrics[f"{name}_mse"])
    assert metrics["rmse"] == pytest.approx(metrics["mse"] ** 0.5)
    assert [row["step"] for row in metrics["per_step"]] == [1, 2, 3]
    assert np.mean([row["mse"] for row in metrics["per_step"]]) == pytest.approx(metrics["mse"])
    # the model's errors come from predictions.csv's unscaled forecasts (first step)
    with open(trained / "reports/sequence/evaluation/predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["windows"]
    first = np.array([float(r["predicted"]) - float(r["actual"]) for r in rows])
    assert metrics["per_step"][0]["mse"] == pytest.approx(float((first**2).mean()), rel=1e-4)
    values = pd.read_csv(trained / "data/raw/series.csv")
    assert rows[0]["timestamp"] == str(pd.Timestamp(values["timestamp"].iloc[480 - 96]))
    stamps = pd.to_datetime([r["timestamp"] for r in rows])  # every test step, whatever the training stride
    assert (stamps[1:] - stamps[:-1] == pd.Timedelta(hours=1)).all()
    assert float(rows[0]["actual"]) == pytest.approx(values["value"].iloc[480 - 96], abs=1e-4)
    report = (trained / "reports/sequence/evaluation/forecast_report.txt").read_text()
    assert "seasonal_naive" in report and "skill" in report


def test_run_logs_test_errors_forecast_plot_and_curves(trained):
    run_info = json.loads((trained / "models/sequence/run.json").read_text())
    client = mlflow_client(trained)
    run = client.get_run(run_info["run_id"])
    assert run.info.status == "FINISHED"
    assert {"test_rmse", "test_naive_rmse", "test_seasonal_naive_rmse", "test_skill_vs_naive", "val_mae",
            "val_rmse"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_step_mse")] == [1, 2, 3]
    assert run.data.params["model.name"] == "gru" and run.data.params["model.hidden"] == "8"
    artifacts = {a.path for d in ("plots", "evaluation") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"plots/curves.png", "evaluation/forecast.png", "evaluation/forecast_report.txt",
            "evaluation/predictions.csv"} <= artifacts
    history = pd.read_csv(trained / "models/sequence/history.csv")
    assert list(history["epoch"]) == list(range(1, 9)) and {"val_mae", "val_rmse"} <= set(history.columns)


def test_dvc_plots_draw_the_forecast_over_time_and_the_learning_curves(trained, tmp_path):
    """`dvc plots show` over the stage's outputs draws every plot with data. The forecast's x is a
    timestamp: DVC's own templates type it as a number (no valid value, an empty plot), the
    `forecast` template as time. A plots folder's marker file is no plot."""
    project = tmp_path / "project"
    shutil.copytree(trained / "reports", project / "reports")
    shutil.copy(trained / "params.yaml", project / "params.yaml")
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    shutil.copy(REPO / ".dvcignore", project / ".dvcignore")
    dvc(project, "init", "-q", "--no-scm")
    shutil.copytree(REPO / ".dvc/plots", project / ".dvc/plots")  # dvc.yaml's plot templates
    shown = json.loads(dvc(project, "plots", "show", "--json", "-o", str(tmp_path / "html")).stdout)
    assert not [e for e in shown.get("errors", []) if "sequence" in str(e)], shown["errors"]

    [forecast] = shown["data"]["forecast@sequence"]
    spec = forecast["content"]
    assert spec["transform"] == [{"calculate": "toDate(replace(datum['timestamp'], ' ', 'T'))", "as": "time"}]
    assert spec["encoding"]["x"] == {"field": "time", "type": "temporal", "title": "timestamp"}
    with open(project / "reports/sequence/evaluation/forecast.csv", newline="") as f:
        written = list(csv.DictReader(f))
    rows = spec["data"]["values"]
    series = ("actual", "predicted", "naive", "seasonal_naive")
    assert len(rows) == len(written) * len(series) == 48 * 4  # evaluate.plot_steps, every series
    assert {row["field"] for row in rows} == set(series)
    stamps = pd.to_datetime(pd.Series([row["timestamp"].replace(" ", "T") for row in rows]), format="ISO8601")
    assert stamps.notna().all()
    first = stamps[[row["field"] == "actual" for row in rows]].reset_index(drop=True)
    assert (first.diff().dropna() == pd.Timedelta(hours=1)).all()  # the test part's hourly steps
    assert first[0] == pd.Timestamp(written[0]["timestamp"])
    assert all(float(row["dvc_inferred_y_value"]) == float(row[row["field"]]) for row in rows)

    plots = [name for name in shown["data"] if name.startswith("reports/sequence/plots/")]
    assert sorted(plots) == [f"reports/sequence/plots/{n}" for n in ("curves.png", "forecast.png", "history.csv")]
    [history] = shown["data"]["reports/sequence/plots/history.csv"]
    assert history["content"]["encoding"]["x"]["field"] == "epoch"
    assert [int(row["epoch"]) for row in history["content"]["data"]["values"]] == list(range(1, 9))


def test_registered_model_takes_raw_windows_and_matches_evaluation(trained):
    """The served model scales by itself: raw windows in, forecasts in original units out."""
    prepared = load_prepared(trained / "data/prepared/sequence")
    uri = f"sqlite:///{trained / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pytorch.load_model("models:/sequence@champion", map_location="cpu")
    x, _ = series_windows(prepared, "test", raw=True)
    with torch.no_grad():
        served = model(x.index_select(0, torch.arange(len(x))))
    with open(trained / "reports/sequence/evaluation/predictions.csv", newline="") as f:
        evaluated = [float(r["predicted"]) for r in csv.DictReader(f)]
    np.testing.assert_allclose(served[:, 0].numpy(), evaluated, rtol=1e-4)
    promotion = json.loads((trained / "reports/sequence/promotion.json").read_text())
    metrics = json.loads((trained / "reports/sequence/metrics.json").read_text())
    assert promotion["promoted"] and promotion["metric"] == "rmse"
    assert promotion["score"] == pytest.approx(metrics["rmse"], rel=1e-4)  # the gate scores the same test data


def test_gate_keeps_the_champion_when_the_new_forecaster_has_the_higher_error(trained, tmp_path):
    from ratchet.cli import main

    project = tmp_path / "copy"
    shutil.copytree(trained, project)
    write_params(project, tiny_params(**{"sequence.train.epochs": 1, "sequence.train.optimizer.lr": 1e-5,
                                         "sequence.window.stride": 2}))
    for stage in ("train", "promote"):
        assert main([stage, "sequence", "--params", str(project / "params.yaml")]) == 0
    promotion = json.loads((project / "reports/sequence/promotion.json").read_text())
    first = json.loads((trained / "reports/sequence/promotion.json").read_text())
    assert promotion["version"] == 2 and not promotion["promoted"] and promotion["champion_after"] == 1
    assert promotion["score"] > first["score"]
    assert f"rmse {promotion['score']:.4f} vs champion v1 {first['score']:.4f} on the same test split: not better" \
        in promotion["reason"] and "minimize" in promotion["reason"]


@pytest.mark.slow
def test_evaluation_under_two_processes_equals_one(trained, tmp_path):
    """Each test window on exactly one process, errors summed in float64: the same figures, up to
    the float32 rounding of the network itself (torchrun runs each process on one thread, which
    orders the sums inside a GRU differently: differences of ~1e-8 relative)."""
    from ratchet.cli import main

    results = {}
    for nproc in (1, 2):
        project = tmp_path / f"nproc{nproc}"
        shutil.copytree(trained, project)  # the same trained model and test split, its own outputs
        write_params(project, tiny_params(**{"sequence.train.epochs": 8, "sequence.window.stride": 2,
                                             "sequence.evaluate.nproc": nproc, "sequence.evaluate.batch_size": 7}))
        if nproc == 1:
            assert main(["evaluate", "sequence", "--params", str(project / "params.yaml")]) == 0
        else:
            ratchet(project, "evaluate", "sequence")  # torchrun, two gloo processes
        results[nproc] = (json.loads((project / "reports/sequence/metrics.json").read_text()),
                          (project / "reports/sequence/evaluation/predictions.csv").read_text())
    (one, one_rows), (two, two_rows) = results[1], results[2]
    assert two["windows"] == one["windows"] == 96 - HORIZON + 1
    assert two.keys() == one.keys()
    for key, value in one.items():
        if key == "per_step":
            for a, b in zip(two[key], value):
                assert a == pytest.approx(b, rel=1e-6)
        else:
            assert two[key] == pytest.approx(value, rel=1e-6), key
    rows = [list(csv.reader(text.splitlines())) for text in (one_rows, two_rows)]
    assert [r[0] for r in rows[1]] == [r[0] for r in rows[0]]  # every window once, in time order
    np.testing.assert_allclose(np.array([r[1:] for r in rows[1][1:]], float),
                               np.array([r[1:] for r in rows[0][1:]], float), rtol=1e-5)
