"""The Prefect flow end to end on tiny data: real DVC, MLflow, and an ephemeral Prefect server."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import mlflow
import psutil
import pytest
import yaml
from conftest import PATIENCE, dvc, git, mlflow_client, tiny_params, write_params

from ratchet.stages import STEPS
from ratchet.train.checkpoint import load_checkpoint

GOOD = {"tabular.train.epochs": 4, "tabular.train.optimizer.lr": 0.01}
WORSE = {"tabular.train.epochs": 1, "tabular.train.optimizer.lr": 1e-6}


@pytest.mark.slow
def test_flow_trains_tracks_promotes_and_leaves_dvc_up_to_date(dvc_project, monkeypatch):
    """`make run`'s flow in a git + DVC project over a classifier: every family's stages run the
    same way (test_families runs each through its four stages, test_sequence_pipeline checks the
    forecaster's DVC plots)."""
    from prefect.client.orchestration import get_client

    from pipelines.retrain import retrain

    write_params(dvc_project, tiny_params(**GOOD))
    git(dvc_project, "commit", "-qam", "good settings")
    state = retrain(["tabular"], str(dvc_project / "params.yaml"), 0, return_state=True)
    results = state.result()
    assert set(results) == {"tabular"}
    for name, promotion in results.items():
        assert promotion == json.loads((dvc_project / f"reports/{name}/promotion.json").read_text())
        assert promotion["promoted"] and promotion["version"] == 1

    status = json.loads(dvc(dvc_project, "status", "--json").stdout)
    assert not [stage for stage in status if stage.endswith("@tabular") or stage == "demo_data"], status
    assert "Running stage" not in dvc(dvc_project, "repro", "promote@tabular").stdout

    client = mlflow_client(dvc_project)
    assert int(client.get_model_version_by_alias("tabular", "champion").version) == 1
    run_id = json.loads((dvc_project / "models/tabular/run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run_id, "val_loss")) == 4
    assert "test_f1_macro" in run.data.metrics
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=dvc_project, capture_output=True, text=True).stdout
    assert run.data.tags["ratchet.git.commit"] == head.strip()
    assert run.data.tags["ratchet.git.dirty"] == "false"  # a rewritten dvc.lock is not a code change
    with get_client(sync_client=True) as prefect:  # the run names the Prefect flow run that trained it
        flow_run = prefect.read_flow_run(run.data.tags["ratchet.prefect.flow_run_id"])
        assert flow_run.name == "tabular"
        parent = prefect.read_task_run(flow_run.parent_task_run_id)
        assert parent.flow_run_id == state.state_details.flow_run_id
    lock = yaml.safe_load((dvc_project / "dvc.lock").read_text())
    prepared_md5 = lock["stages"]["prepare@tabular"]["outs"][0]["md5"]
    assert run.data.tags["ratchet.dvc.data/prepared/tabular"] == prepared_md5

    # A clearly worse setting through the same flow: registered, re-scored, refused.
    write_params(dvc_project, tiny_params(**WORSE))
    second = retrain(["tabular"], str(dvc_project / "params.yaml"), 0)["tabular"]
    assert not second["promoted"] and second["version"] == 2 and second["champion_after"] == 1
    tags = client.get_model_version("tabular", "2").tags
    assert tags["ratchet.promotion.promoted"] == "false"
    assert re.match(r"f1_macro \d\.\d{4} vs champion v1 \d\.\d{4} on the same test split: not better", tags[
        "ratchet.promotion.reason"])
    assert int(client.get_model_version_by_alias("tabular", "champion").version) == 1
    assert client.get_run(client.get_model_version("tabular", "2").run_id).data.tags["ratchet.git.dirty"] == "true"
    status = json.loads(dvc(dvc_project, "status", "--json").stdout)
    assert not [stage for stage in status if stage.endswith("@tabular") or stage == "demo_data"], status

    # Another tracking store (a team's server, a new mlflow.db): DVC finds nothing stale, but that
    # store holds no run of the trained model, so the flow trains and registers it there.
    other = dvc_project / "team.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    third = retrain(["tabular"], str(dvc_project / "params.yaml"), 0)["tabular"]
    assert third["promoted"] and third["version"] == 1  # the first model of that store
    run_id = json.loads((dvc_project / "models/tabular/run.json").read_text())["run_id"]
    team = mlflow.MlflowClient(tracking_uri=f"sqlite:///{other}", registry_uri=f"sqlite:///{other}")
    assert team.get_model_version_by_alias("tabular", "champion").run_id == run_id
    assert int(client.get_model_version_by_alias("tabular", "champion").version) == 1  # the old store: untouched
    assert len(client.search_model_versions("name='tabular'")) == 2


@pytest.mark.slow
def test_flow_retries_a_killed_training_which_resumes_its_run(dvc_project):
    write_params(dvc_project, tiny_params(**{"tabular.train.epochs": 40, "tabular.train.batch_size": 8}))
    checkpoint = dvc_project / "checkpoints/tabular.pt"
    flow = subprocess.Popen([sys.executable, "-m", "pipelines.retrain", "tabular", "--train-retries", "1"],
                            cwd=dvc_project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed_at = None
    deadline = time.monotonic() + PATIENCE
    while killed_at is None and time.monotonic() < deadline and flow.poll() is None:
        if checkpoint.exists() and load_checkpoint(checkpoint)["epoch"] >= 2:
            for child in psutil.Process(flow.pid).children(recursive=True):
                if child.cmdline()[-2:] == ["train", "tabular"]:
                    killed_at = load_checkpoint(checkpoint)
                    child.send_signal(signal.SIGKILL)
        time.sleep(0.02)
    out, _ = flow.communicate(timeout=PATIENCE)
    assert killed_at is not None, out
    assert flow.returncode == 0, out
    assert "resuming tabular from" in out  # the retry picked the checkpoint up
    at = [out.find(f"[pipeline 1/1 tabular] step {i}/4 {step}") for i, step in enumerate(STEPS, 1)]
    assert -1 not in at and at == sorted(at), out  # the log heads every step, in the order they ran
    assert not [hint for hint in ("To track the changes with git", "git add dvc.lock", "autostage", "dvc push")
                if hint in out], out  # DVC's advice for a person at a prompt is left out
    assert "make ui -> http://127.0.0.1:5000" in out  # no tracking server: the summary points at make ui
    run_id = json.loads((dvc_project / "models/tabular/run.json").read_text())["run_id"]
    assert run_id == killed_at["run_id"]
    client = mlflow_client(dvc_project)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(run_id, "val_loss")} == set(range(1, 41))
    assert json.loads((dvc_project / "reports/tabular/promotion.json").read_text())["promoted"]
    assert json.loads(dvc(dvc_project, "status", "--json", "promote@tabular").stdout) == {}


def test_a_failed_stage_is_reported_by_its_own_one_line_error(dvc_project):
    """The flow's last line names the stage that failed and the cause it printed (file, column),
    not only DVC's "failed to reproduce"."""
    import os

    from pipelines.retrain import failure_message

    (dvc_project / "data/raw/table.csv").write_text("f0,f1,label\n1,2,a\n3,x,b\n")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "train@tabular"], cwd=dvc_project, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=PATIENCE)
    assert proc.returncode != 0
    message = failure_message("train@tabular", proc.returncode, proc.stdout.splitlines())
    assert message.startswith("prepare@tabular: ") and "\n" not in message, proc.stdout
    assert message.endswith("column 'f1' is not numeric (line 3: 'x')"), message
    assert str(dvc_project / "data/raw/table.csv") in message
    # without a line of its own (a crash), DVC's last error line stands in
    assert failure_message("x", 255, ["Traceback", "ERROR: failed to reproduce 'x': boom"]) == \
        "dvc repro x failed (exit 255): ERROR: failed to reproduce 'x': boom"


@pytest.mark.slow
def test_a_stages_own_error_fails_the_flow_after_one_attempt(dvc_project):
    """A registry mismatch (the champion takes other inputs) is deterministic: the train stage
    refuses it with one line, and the flow stops there instead of retrying the same refusal."""
    client = mlflow_client(dvc_project)
    experiment = client.create_experiment("other-data", artifact_location=(dvc_project / "mlartifacts").as_uri())
    run = client.create_run(experiment)
    client.set_terminated(run.info.run_id)
    client.create_registered_model("tabular")
    client.create_model_version("tabular", f"runs:/{run.info.run_id}/model", run.info.run_id,
                                tags={"ratchet.input": "features: height, weight"})
    client.set_registered_model_alias("tabular", "champion", "1")

    flow = subprocess.run([sys.executable, "-m", "pipelines.retrain", "tabular", "--train-retries", "2"],
                          cwd=dvc_project, capture_output=True, text=True, timeout=PATIENCE)
    out = flow.stdout + flow.stderr
    assert flow.returncode == 1, out
    assert out.count("Running stage 'train@tabular'") == 1, out  # one attempt, no retry
    assert "Retry 1/2" not in out
    assert ("error: train@tabular: registered model 'tabular': champion v1 takes features: height, weight, this "
            "data has features: f0, f1, f2, f3, f4, f5; classes: class_0, class_1, class_2; set promote.registered_model to a new name for a new dataset"
            ) in flow.stderr.splitlines()
    assert not (dvc_project / "models/tabular").exists()
