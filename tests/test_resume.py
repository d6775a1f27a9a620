"""Kill -9 a training mid-run, restart it: it resumes from the checkpoint, continues the same
MLflow run, and ends with exactly the weights of a run that was never interrupted."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import make_csv, mlflow_client, ratchet, tiny_params, write_params

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
    deadline = time.monotonic() + 120
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
    steps = {m.step for m in client.get_metric_history(run_id, "val_loss")}
    assert steps == set(range(1, EPOCHS + 1))
    assert not checkpoint.exists()  # removed once the training finished


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
