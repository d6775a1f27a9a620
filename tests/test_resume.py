"""Kill -9 a training mid-run, restart it: it resumes from the checkpoint, continues the same
MLflow run, and ends with exactly the weights of a run that was never interrupted."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PATIENCE, alive, descendants, make_csv, mlflow_client, ratchet, runs_by_status, tiny_params, write_params

from ratchet.train.checkpoint import load_checkpoint

EPOCHS = 6
# Dropout on: an exact match needs the restored RNG state, not only the weights.
SETTINGS = {"tabular.train.epochs": EPOCHS, "tabular.train.batch_size": 16, "tabular.model.dropout": 0.2,
            "tabular.model.hidden": [64, 32], "tabular.train.scheduler": {"name": "step", "step_size": 2}}


def new_project(path):
    make_csv(path / "data/raw/table.csv", rows=12000, features=10)
    write_params(path, tiny_params(**SETTINGS))
    ratchet(path, "prepare", "tabular")
    return path


def final_weights(project) -> dict[str, torch.Tensor]:
    return torch.load(project / "models/tabular/model.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_weights_and_run(tmp_path):
    straight = new_project(tmp_path / "straight")
    ratchet(straight, "train", "tabular")

    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(straight / "data", killed / "data")
    write_params(killed, tiny_params(**SETTINGS))
    checkpoint = killed / "checkpoints/tabular.pt"
    proc = subprocess.Popen([sys.executable, "-m", "ratchet", "train", "tabular", "--params", "params.yaml"],
                            cwd=killed, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + PATIENCE
    state = None
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoint.exists():
            state = load_checkpoint(checkpoint)
            if state["epoch"] >= 2:
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state is not None and 2 <= state["epoch"] < EPOCHS, "the kill did not land mid-run"
    interrupted = load_checkpoint(checkpoint)
    run_id = interrupted["run_id"]
    assert not (killed / "models/tabular").exists()  # no outputs from an unfinished training
    client = mlflow_client(killed)
    assert client.get_run(run_id).info.status == "RUNNING"  # SIGKILL: nothing could close it

    resumed = ratchet(killed, "train", "tabular")
    assert f"resuming tabular from {checkpoint} after epoch {interrupted['epoch']}" in resumed.stdout

    for key, value in final_weights(straight).items():
        assert torch.equal(final_weights(killed)[key], value), key
    assert json.loads((killed / "models/tabular/run.json").read_text())["run_id"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    steps = sorted(m.step for m in client.get_metric_history(run_id, "val_loss"))
    assert steps == list(range(1, EPOCHS + 1))  # each epoch logged once
    assert not checkpoint.exists()  # removed once the training finished


def _start_training(project):
    return subprocess.Popen([sys.executable, "-m", "ratchet", "train", "tabular", "--params", "params.yaml"],
                            cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_a_kill_before_the_first_checkpoint_continues_its_run_and_leftovers_are_removed(tmp_path):
    """SIGKILL after the run started but before any checkpoint: the restart finds the run (its
    marker) and finishes it; temporaries a killed training left are removed; one run, one
    registered version, each epoch logged once."""
    project = new_project(tmp_path)
    checkpoint = project / "checkpoints/tabular.pt"
    marker = project / "checkpoints/tabular.pt.run.json"
    proc = _start_training(project)
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not checkpoint.exists(), "the kill did not land before the first checkpoint"
    run_id = json.loads(marker.read_text())["run_id"]
    client = mlflow_client(project)
    assert client.get_run(run_id).info.status == "RUNNING"
    (project / "checkpoints/.tabular.pt.k2j4x").write_bytes(b"half a checkpoint")  # as save_checkpoint names them
    (project / "models").mkdir(exist_ok=True)
    (project / "models/.tabular.a8f3").mkdir()  # a half-written output folder
    (project / "models/.tabular.a8f3/model.pt").write_bytes(b"half a model")

    ratchet(project, "train", "tabular")
    assert json.loads((project / "models/tabular/run.json").read_text())["run_id"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [r.info.status for r in client.search_runs([client.get_run(run_id).info.experiment_id])] == ["FINISHED"]
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_loss")) == list(range(1, EPOCHS + 1))
    assert [v.version for v in client.search_model_versions("name='tabular'")] in (["1"], [1])
    assert sorted(p.name for p in (project / "checkpoints").iterdir()) == []  # marker and leftovers gone
    assert sorted(p.name for p in (project / "models").iterdir()) == ["tabular"]


def test_epochs_missing_from_mlflow_after_a_kill_are_logged_once_on_resume(tmp_path):
    """A kill between an epoch's checkpoint and its metrics: the resumed run logs that epoch from
    the checkpoint's history, and none twice."""
    import mlflow

    from ratchet.stages.train import _log_missing_epochs

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 2.0 / e} for e in (1, 2, 3)]
    with mlflow.start_run() as run:
        for record in history[:2]:
            mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])
        _log_missing_epochs(run.info.run_id, history)
        _log_missing_epochs(run.info.run_id, history)  # again: nothing new
    client = mlflow.MlflowClient()
    steps = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_loss"))
    assert steps == [(1, 2.0), (2, 1.0), (3, 2.0 / 3)]
    mlflow.set_tracking_uri(None)


def test_registration_is_once_per_run_even_when_the_model_is_logged_again(tmp_path):
    import warnings

    import mlflow
    import numpy as np
    from torch import nn

    from ratchet.tracking.registry import register

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    with mlflow.start_run() as run, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uris = [mlflow.pytorch.log_model(nn.Linear(2, 1), name="model", pip_requirements=["torch"],
                                         input_example=np.ones((1, 2), np.float32)).model_uri
                for _ in range(2)]  # the first logging, then the resumed run's
        versions = [register(client, "m", uri, run.info.run_id, {}).version for uri in uris]
    assert uris[0] != uris[1] and versions == [versions[0]] * 2
    assert len(client.search_model_versions("name='m'")) == 1
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_a_checkpoint_from_other_params_is_not_resumed(tmp_path):
    project = tmp_path
    make_csv(project / "data/raw/table.csv")
    write_params(project, tiny_params(**{"tabular.train.epochs": 2}))
    ratchet(project, "prepare", "tabular")
    ratchet(project, "train", "tabular")
    first_run = json.loads((project / "models/tabular/run.json").read_text())["run_id"]
    # Leave a checkpoint as a crash would, then change a hyperparameter.
    stale = torch.load(project / "models/tabular/model.pt", weights_only=True)
    from ratchet.train.checkpoint import save_checkpoint

    save_checkpoint(project / "checkpoints/tabular.pt", {"config_hash": "other", "run_id": first_run, "epoch": 1,
                                                          "model": stale["model"]})
    write_params(project, tiny_params(**{"tabular.train.epochs": 2, "tabular.train.optimizer.lr": 0.02}))
    proc = ratchet(project, "train", "tabular")
    assert "written for other params or data; starting afresh" in proc.stdout
    assert json.loads((project / "models/tabular/run.json").read_text())["run_id"] != first_run


@pytest.mark.slow
def test_sigterm_to_a_ddp_training_stops_its_workers_and_marks_the_run_killed(tmp_path):
    project = new_project(tmp_path)
    write_params(project, tiny_params(**{**SETTINGS, "tabular.train.epochs": 40, "tabular.train.nproc": 2}))
    checkpoint = project / "checkpoints/tabular.pt"
    proc = subprocess.Popen([sys.executable, "-m", "ratchet", "train", "tabular", "--params", "params.yaml"],
                            cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline and proc.poll() is None and not checkpoint.exists():
        time.sleep(0.05)
    assert checkpoint.exists(), "training did not reach its first checkpoint"
    tree = descendants(proc.pid)
    workers = [pid for pid in tree if b"torch.distributed.run" not in Path(f"/proc/{pid}/cmdline").read_bytes()
               and b"ratchet" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(workers) == 2, tree
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=PATIENCE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(pid) for pid in tree):
            time.sleep(0.1)
        left = [pid for pid in tree if alive(pid)]
    finally:
        for pid in tree:  # whatever the outcome, nothing of this test keeps running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out = proc.communicate()[0]
    assert proc.returncode == 130, out
    assert not left, f"{len(left)} processes left running after the stage stopped"
    assert runs_by_status(project) == {"KILLED": 1}
    assert load_checkpoint(checkpoint)["epoch"] >= 1  # kept: a restart resumes from it
