"""Team mode on real servers (`make team-up`): PostgreSQL, MLflow's tracking server with basic
auth and proxied artifacts, a Prefect server, a process work pool and worker, the scheduled
deployment. One stack for the whole file, started and stopped by pipelines/team.py as
`make team-up` / `make team-down` do; the tests run in file order.

    make test-team        # pytest -m team (CI runs it after make test)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psycopg2
import pytest

from conftest import PATIENCE, free_port, make_dvc_project, tiny_params, wait_for, write_params
from pipelines import team as teamctl

pytestmark = [pytest.mark.team, pytest.mark.slow]




def weak_tabular(epochs: int, lr: float) -> dict:
    params = tiny_params(**{"tabular.train.epochs": epochs, "tabular.train.optimizer.lr": lr})
    params["pipelines"] = {"tabular": params["pipelines"]["tabular"]}
    params["schedule"] = {"cron": "* * * * *", "pipelines": ["tabular"]}  # fires every minute
    return params


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = make_dvc_project(tmp_path_factory.mktemp("team-project"), weak_tabular(epochs=1, lr=1e-4))
    # PostgreSQL runs as the postgres user when the tests run as root: its folder cannot be
    # under pytest's tmp_path, which only its owner can enter.
    state = Path(tempfile.mkdtemp(prefix="ratchet-team-"))
    state.chmod(0o755)
    ports = {name: free_port() for name in teamctl.PORTS}
    team = teamctl.Team.load(root, state, ports)
    started = time.monotonic()
    try:  # a failed up leaves what it started running: down stops it
        teamctl.up(team, say=lambda line: None)
        team.up_seconds = time.monotonic() - started
        yield team
    finally:
        teamctl.down(teamctl.Team.load(root, state))
        shutil.rmtree(state, ignore_errors=True)


def api(team, path: str, body: dict | None = None):
    url = team.env()["PREFECT_API_URL"] + path
    response = httpx.post(url, json=body or {}, timeout=30)
    response.raise_for_status()
    return response.json()


def deployment(team) -> dict:
    [found] = api(team, "/deployments/filter")
    return found


def flow_runs(team, **filters) -> list[dict]:
    return api(team, "/flow_runs/filter", {"flow_runs": filters, "sort": "EXPECTED_START_TIME_ASC"})


def registry(team) -> dict:
    """{'versions': {version: run_id}, 'champion': version} from the MLflow database itself."""
    with psycopg2.connect(team.db_url("mlflow")) as conn, conn.cursor() as cur:
        cur.execute("SELECT version, run_id FROM model_versions WHERE name = 'tabular'")
        versions = dict(cur.fetchall())
        cur.execute("SELECT version FROM registered_model_aliases WHERE name = 'tabular' AND alias = 'champion'")
        champions = [row[0] for row in cur.fetchall()]
    conn.close()
    assert len(champions) <= 1
    return {"versions": versions, "champion": champions[0] if champions else None}


def run_metric(team, run_id: str, key: str) -> float:
    env = team.env()
    response = httpx.get(f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/runs/get", params={"run_id": run_id},
                         auth=(env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]), timeout=30)
    response.raise_for_status()
    return {m["key"]: m["value"] for m in response.json()["run"]["data"]["metrics"]}[key]


def test_team_up_writes_team_env_and_mlflow_asks_for_the_generated_credentials(stack):
    env_text = stack.env_file.read_text()
    assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{stack.ports['mlflow']}" in env_text
    assert f"export PREFECT_API_URL=http://127.0.0.1:{stack.ports['prefect']}/api" in env_text
    assert oct(stack.env_file.stat().st_mode & 0o777) == "0o600"
    uri = stack.env()["MLFLOW_TRACKING_URI"]
    search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert httpx.get(search, timeout=30).status_code == 401
    assert httpx.get(search, auth=("ratchet", "wrong"), timeout=30).status_code == 401
    assert httpx.get(search, auth=("ratchet", stack.secrets["admin"]), timeout=30).status_code == 200
    for port in stack.ports.values():  # loopback only
        assert subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout.split()[3] \
            .startswith("127.0.0.1:")
    found = deployment(stack)
    assert found["schedules"][0]["schedule"]["cron"] == "* * * * *"  # from params.yaml's schedule.cron
    assert found["work_pool_name"] == teamctl.POOL and found["global_concurrency_limit"]["limit"] == 1
    assert found["parameters"]["pipelines"] == ["tabular"]


def test_the_schedule_fires_and_trains_to_the_server(stack):
    """The cron schedule (every minute) creates a run by itself; the worker runs it in the
    project; the run is tracked to the server: champion on PostgreSQL, artifacts in the
    server's store, no mlflow.db in the project."""
    dep = deployment(stack)
    first = wait_for(lambda: flow_runs(stack, deployment_id={"any_": [dep["id"]]},
                                       state={"type": {"any_": ["COMPLETED", "FAILED", "CRASHED"]}}),
                     240, "a scheduled run to finish", every=3)[0]
    worker_log = (stack.dir / "worker.log").read_text()[-3000:]
    assert first["state_type"] == "COMPLETED", worker_log
    assert first["auto_scheduled"] and first["expected_start_time"][17:19] == "00"  # the cron made it
    assert not (stack.root / "mlflow.db").exists() and not (stack.root / "mlruns").exists()
    reg = registry(stack)
    assert reg["champion"] == 1 and list(reg["versions"]) == [1]
    run_id = reg["versions"][1]
    assert run_id == json.loads((stack.root / "models/tabular/run.json").read_text())["run_id"]
    assert list((stack.dir / "artifacts").glob(f"*/{run_id}/artifacts/checkpoint/*")), "artifacts not on the server"
    # Later minutes' runs find everything up to date: no new version.
    api(stack, f"/deployments/{dep['id']}/pause_deployment")
    stack.first_score = run_metric(stack, run_id, "test_f1_macro")


def test_two_flows_at_once_wait_for_each_other_and_leave_one_better_champion(stack):
    """A run by hand while the deployment runs twice (Prefect can start a scheduled run twice):
    the deployment's concurrency limit queues its second run, the project lock makes the hand
    run and the deployment wait for each other; all complete, one new version, one champion."""
    write_params(stack.root, weak_tabular(epochs=4, lr=0.01))  # a better model than the first
    dep = deployment(stack)
    before = {run["id"] for run in flow_runs(stack, deployment_id={"any_": [dep["id"]]})}
    log_start = (stack.dir / "worker.log").stat().st_size
    env = {**os.environ, **stack.env(), "PREFECT_HOME": str(stack.dir / "prefect")}
    by_hand = subprocess.Popen([sys.executable, "-m", "pipelines.retrain", "tabular"], cwd=stack.root, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(by_hand.stdout), daemon=True)
    reader.start()
    triggered = [api(stack, f"/deployments/{dep['id']}/create_flow_run") for _ in range(2)]
    assert by_hand.wait(timeout=PATIENCE) == 0, "".join(output)
    reader.join(timeout=10)
    ids = [run["id"] for run in triggered]

    def finished():
        runs = flow_runs(stack, id={"any_": ids})
        return runs if all(run["state_type"] in ("COMPLETED", "FAILED", "CRASHED") for run in runs) else None

    runs = wait_for(finished, PATIENCE, "the two deployment runs", every=3)
    worker_log = (stack.dir / "worker.log").read_bytes()[log_start:].decode(errors="replace")
    assert [run["state_type"] for run in runs] == ["COMPLETED", "COMPLETED"], worker_log[-4000:]
    assert not before & set(ids)
    text = "".join(output) + worker_log
    assert "waiting for flow run" in text  # someone did wait: they really overlapped
    reg = registry(stack)
    assert sorted(reg["versions"]) == [1, 2], reg
    scores = {1: stack.first_score, 2: run_metric(stack, reg["versions"][2], "test_f1_macro")}
    assert reg["champion"] == max(scores, key=scores.get), scores
    assert scores[2] > scores[1], scores  # the second model was meant to be the better one


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_served_deployment_stops_on_sigint_and_sigterm(stack, sig):
    """`python -m pipelines.deploy` serving from a shell's background job, where SIGINT starts
    out ignored: both signals stop it within seconds, exit 0."""
    env = {**os.environ, **stack.env(), "PREFECT_HOME": str(stack.dir / "prefect")}
    served = subprocess.Popen([sys.executable, "-m", "pipelines.deploy", "--name", f"served-{sig.name}"],
                              cwd=stack.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert "serving ratchet-retrain/" in served.stdout.readline()
        time.sleep(3)  # the runner is polling
        served.send_signal(sig)
        assert served.wait(timeout=20) == 0
        assert "stopped serving" in served.stdout.read()
    finally:
        if served.poll() is None:
            served.kill()


def test_team_down_leaves_nothing_listening_and_a_second_up_keeps_the_data(stack):
    teamctl.down(teamctl.Team.load(stack.root, stack.dir))
    for name, port in stack.ports.items():
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"{name} still listens on {port}"
    again = teamctl.Team.load(stack.root, stack.dir)
    assert again.ports == stack.ports and again.secrets == stack.secrets and not again.pids
    started = time.monotonic()
    teamctl.up(again, say=lambda line: None)
    print(f"team-up: first {stack.up_seconds:.0f} s, again {time.monotonic() - started:.0f} s")
    assert registry(again)["versions"].keys() == {1, 2}
