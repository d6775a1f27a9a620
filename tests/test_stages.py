"""The stages against real MLflow (SQLite): tracking content, the promotion gate both ways,
evaluation under 2 processes, and failures that leave no RUNNING run and no partial output."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import make_csv, mlflow_client, ratchet, runs_by_status, tiny_params, write_params

from ratchet.config import load_params
from ratchet.errors import RatchetError
from ratchet.families import get_family
from ratchet.stages import evaluate, prepare, promote, train
from ratchet.tracking.registry import load_served_model

GOOD = {"tabular.train.epochs": 6, "tabular.train.optimizer.lr": 0.01}
WORSE = {"tabular.train.epochs": 1, "tabular.train.optimizer.lr": 1e-6}


def stage(project, module, **overrides):
    write_params(project, tiny_params(**overrides))
    return module.run(load_params(project / "params.yaml"), "tabular")


def train_and_promote(project, **overrides) -> dict:
    stage(project, train, **overrides)
    return stage(project, promote, **overrides)


def test_a_training_run_holds_params_epochs_checkpoint_and_report(project):
    stage(project, prepare)
    stage(project, train, **GOOD)
    stage(project, evaluate, **GOOD)
    run_id = json.loads((project / "models/tabular/run.json").read_text())["run_id"]
    client = mlflow_client(project)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.optimizer.lr"] == "0.01" and run.data.params["model.hidden"] == "[16, 8]"
    assert not [k for k in run.data.metrics if k.startswith("system/")]  # system metrics are off by default
    assert [m.step for m in client.get_metric_history(run_id, "val_f1_macro")] == [1, 2, 3, 4, 5, 6]
    assert 0.5 < run.data.metrics["test_accuracy"] <= 1.0
    assert "test_class_class_0_f1" in run.data.metrics
    artifacts = {a.path for d in ("checkpoint", "evaluation", "plots") for a in client.list_artifacts(run_id, d)}
    assert {"checkpoint/model.pt", "evaluation/classification_report.txt", "evaluation/confusion_matrix.png",
            "evaluation/classification_report.json", "plots/curves.png"} <= artifacts
    assert run.data.tags["ratchet.git.commit"] == "unknown"  # not a git repo here; see the flow test
    meta = json.loads((project / "data/prepared/tabular/meta.json").read_text())
    assert run.data.tags["ratchet.data.hash"] == meta["data_hash"]
    metrics = json.loads((project / "reports/tabular/metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])
    assert set(metrics["per_class"]) == {"class_0", "class_1", "class_2"}


def test_promotion_gate_promotes_better_and_refuses_worse(project):
    stage(project, prepare)
    first = train_and_promote(project, **WORSE)
    assert first["promoted"] and first["version"] == 1 and first["reason"].startswith("first model")
    better = train_and_promote(project, **GOOD)
    assert better["promoted"] and better["champion_before"]["version"] == 1
    assert better["score"] > better["champion_before"]["score"]
    worse = train_and_promote(project, **WORSE)
    assert not worse["promoted"] and worse["version"] == 3 and worse["champion_after"] == 2
    assert "not better" in worse["reason"]

    client = mlflow_client(project)
    assert int(client.get_model_version_by_alias("tabular", "champion").version) == 2
    tags = client.get_model_version("tabular", "3").tags
    assert tags["ratchet.promotion.promoted"] == "false"
    assert tags["ratchet.promotion.reason"] == worse["reason"]
    assert json.loads((project / "reports/tabular/promotion.json").read_text()) == worse


def test_promote_rerun_registers_nothing_new(project):
    stage(project, prepare)
    first = train_and_promote(project, **GOOD)
    again = stage(project, promote, **GOOD)
    assert again["version"] == first["version"] and not again["promoted"] and again["champion_unchanged"]
    assert again["reason"] == f"v{first['version']} is @champion already: champion unchanged"
    assert again["champion_after"] == first["version"]
    tags = mlflow_client(project).get_model_version("tabular", str(first["version"])).tags
    assert tags["ratchet.promotion.promoted"] == "true"  # the decision that promoted it stays recorded
    assert len(mlflow_client(project).search_model_versions("name='tabular'")) == 1
    run_id = json.loads((project / "models/tabular/run.json").read_text())["run_id"]
    version = mlflow_client(project).get_model_version("tabular", "1")
    assert version.run_id == run_id and len(version.tags["ratchet.input.sha256"]) == 16


def test_champion_is_rescored_on_the_current_test_split(project):
    stage(project, prepare)
    first = train_and_promote(project, **GOOD)
    other = {**GOOD, "tabular.seed": 99, "tabular.promote.min_samples": 1}
    stage(project, prepare, **other)  # another split: other test rows
    second = train_and_promote(project, **other)
    cfg = load_params(project / "params.yaml").pipeline("tabular")
    family = get_family("tabular")
    prepared = family.load(cfg.prepare.out_dir)
    meta = prepared.meta
    # the champion's own training rows are left out (tests/test_gate.py); the rest is scored now
    champion = mlflow_client(project).get_model_version("tabular", "1")
    _, keep = promote.unseen(family, cfg, prepared, {"champion": champion})
    x = np.load(cfg.prepare.out_dir / "test_x_raw.npy")[keep]
    y = np.load(cfg.prepare.out_dir / "test_y.npy")[keep]
    now = family.score(cfg, load_served_model(mlflow_client(project), "tabular", "1"), meta, x, y, "f1_macro")
    assert second["champion_before"]["score"] == pytest.approx(now)
    assert now != pytest.approx(first["score"])  # the number stored from the old split was not used


def test_a_new_dataset_under_the_old_model_name_fails_before_training(project):
    stage(project, prepare)
    train_and_promote(project, **GOOD)
    df = pd.read_csv(project / "data/raw/table.csv").drop(columns="f5")
    df.to_csv(project / "data/raw/table.csv", index=False)
    stage(project, prepare)
    with pytest.raises(RatchetError, match=r"champion v1 takes features: f0, f1, f2, f3, f4, f5; classes: class_0, "
                                           r"class_1, class_2, this data has features: f0, f1, f2, f3, f4; classes: "
                                           r"class_0, class_1, class_2; set promote.registered_model"):
        stage(project, train, **GOOD)
    assert len(mlflow_client(project).search_model_versions("name='tabular'")) == 1
    assert runs_by_status(project) == {"FINISHED": 1}  # no run was started for the refused training

    # the same features with other classes: the champion's outputs mean something else
    make_csv(project / "data/raw/table.csv")
    df = pd.read_csv(project / "data/raw/table.csv")
    df[df["label"] != "class_2"].to_csv(project / "data/raw/table.csv", index=False)
    stage(project, prepare)
    with pytest.raises(RatchetError, match=r"champion v1 takes features: f0, f1, f2, f3, f4, f5; classes: class_0, "
                                           r"class_1, class_2, this data has features: f0, f1, f2, f3, f4, f5; "
                                           r"classes: class_0, class_1; set promote.registered_model"):
        stage(project, train, **GOOD)
    assert runs_by_status(project) == {"FINISHED": 1}
    renamed = train_and_promote(project, **GOOD, **{"tabular.promote.registered_model": "tabular_v2_data"})
    assert renamed["promoted"] and renamed["reason"].startswith("first model")


@pytest.mark.slow
def test_evaluation_under_two_processes_equals_one(project):
    stage(project, prepare)
    stage(project, train, **GOOD)
    ratchet(project, "evaluate", "tabular")
    alone = json.loads((project / "reports/tabular/metrics.json").read_text())
    alone_predictions = (project / "reports/tabular/evaluation/predictions.csv").read_text()
    write_params(project, tiny_params(**GOOD, **{"tabular.evaluate.nproc": 2}))
    ratchet(project, "evaluate", "tabular")
    pair = json.loads((project / "reports/tabular/metrics.json").read_text())
    assert pair["samples"] == alone["samples"] == 45  # each test sample counted once, none padded
    assert_close(pair, alone)
    assert (project / "reports/tabular/evaluation/predictions.csv").read_text() == alone_predictions


@pytest.mark.slow
def test_training_under_two_processes_ends_where_one_process_does(project):
    import torch

    settings = {**GOOD, "tabular.model.batchnorm": True, "tabular.train.batch_size": 30}  # 15 per process
    stage(project, prepare)
    write_params(project, tiny_params(**settings))
    ratchet(project, "train", "tabular")
    alone = torch.load(project / "models/tabular/model.pt", weights_only=True)
    write_params(project, tiny_params(**settings, **{"tabular.train.nproc": 2}))
    proc = ratchet(project, "train", "tabular")  # re-launches itself under torchrun, gloo
    pair = torch.load(project / "models/tabular/model.pt", weights_only=True)
    assert proc.stdout.count("trained tabular:") == 1  # rank 0 alone prints and writes
    assert pair["metrics"]["best_epoch"] == alone["metrics"]["best_epoch"]
    assert pair["model"].keys() == alone["model"].keys()  # saved with plain BatchNorm names
    for key, value in alone["model"].items():
        torch.testing.assert_close(pair["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    client = mlflow_client(project)
    run = client.get_run(json.loads((project / "models/tabular/run.json").read_text())["run_id"])
    assert run.data.params["world_size"] == "2" and run.info.status == "FINISHED"
    assert runs_by_status(project) == {"FINISHED": 2}


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, dict):
            assert_close(value, b[key])
        else:
            assert value == pytest.approx(b[key], rel=1e-6), key


def test_training_that_fails_mid_run_ends_the_run_failed_and_writes_nothing(project):
    stage(project, prepare)
    x = np.load(project / "data/prepared/tabular/train_x.npy")
    x[3, 1] = np.nan  # corrupt prepared data: the loss turns NaN in the first epoch
    np.save(project / "data/prepared/tabular/train_x.npy", x)
    proc = ratchet(project, "train", "tabular", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: training loss is nan in epoch 1")
    assert runs_by_status(project) == {"FAILED": 1}
    assert not (project / "models/tabular").exists()
    assert not list(project.glob("models/.*"))  # no temporary output directory left behind
    assert (project / "checkpoints/tabular.pt").exists() is False  # it failed before any epoch finished


@pytest.mark.slow
def test_whole_pipeline_on_a_bad_csv_stops_at_prepare(project):
    (project / "data/raw/table.csv").write_text("f0,f1,label\n1,2,a\n3,x,b\n")
    proc = ratchet(project, "prepare", "tabular", check=False)
    assert proc.returncode == 2 and "column 'f1' is not numeric (line 3: 'x')" in proc.stderr
    for later in ("train", "evaluate", "promote"):
        proc = ratchet(project, later, "tabular", check=False)
        assert proc.returncode == 2 and "run the prepare stage first" in proc.stderr, proc.stderr
    assert runs_by_status(project) == {}
    assert not any((project / d).exists() for d in ("data/prepared", "models", "reports"))


def test_a_model_whose_mlflow_run_is_gone_stops_evaluate_and_promote_in_one_line(project, monkeypatch):
    """A model restored by DVC after mlflow.db was deleted (or trained against another store)
    points at a run that store has never seen: one line naming run.json and how to retrain."""
    from mlflow import MlflowClient

    stage(project, prepare)
    stage(project, train, **GOOD)
    run_id = json.loads((project / "models/tabular/run.json").read_text())["run_id"]
    mlflow_client(project).delete_model_version("tabular", "1")
    with pytest.raises(RatchetError) as version_gone:
        stage(project, promote, **GOOD)
    assert "is there but its model version tabular v1 is not in the tracking store" in str(version_gone.value)
    other = f"sqlite:///{project / 'other.db'}"  # a fresh store, as after `rm mlflow.db`
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    for module in (evaluate, promote):
        with pytest.raises(RatchetError) as run_gone:
            stage(project, module, **GOOD)
        message = str(run_gone.value)
        assert message.startswith(f"{project / 'models/tabular/run.json'}: MLflow run {run_id} is not in the "
                                  f"tracking store {other} (")
        assert message.endswith("train again with `dvc repro --force train@tabular`") and "\n" not in message
    assert not (project / "reports").exists()
    client = MlflowClient(other)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []  # nothing opened


def test_system_metrics_are_an_option_of_the_training_run(project, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # seconds; MLflow's default is 10
    stage(project, prepare)
    stage(project, train, **{"tabular.train.system_metrics": True, "tabular.train.epochs": 10})
    run_id = json.loads((project / "models/tabular/run.json").read_text())["run_id"]
    metrics = mlflow_client(project).get_run(run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics), metrics
