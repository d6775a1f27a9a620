"""Scheduled retraining against a real Prefect server: the cron schedule creates runs, and the
served deployment executes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
from conftest import PATIENCE, free_port, wait_for




@pytest.mark.slow
def test_cron_deployment_schedules_runs_and_serves_them(dvc_project, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    served = None
    try:
        def healthy():
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, PATIENCE, "the Prefect server")
        served = subprocess.Popen([sys.executable, "-m", "pipelines.deploy", "--cron", "0 3 * * 1", "tabular"],
                                  cwd=dvc_project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        deployment = wait_for(
            lambda: httpx.post(f"{api}/deployments/filter", json={}).json(), PATIENCE, "the deployment")[0]
        assert deployment["name"] == "scheduled"
        assert deployment["schedules"][0]["schedule"]["cron"] == "0 3 * * 1"

        def runs(state: str) -> list:
            body = {"deployments": {"id": {"any_": [deployment["id"]]}},
                    "flow_runs": {"state": {"type": {"any_": [state]}}}}
            return httpx.post(f"{api}/flow_runs/filter", json=body).json()

        # The server's scheduler creates the upcoming Monday 03:00 runs on its own.
        upcoming = wait_for(lambda: runs("SCHEDULED"), PATIENCE, "scheduled runs")
        assert {run["expected_start_time"][11:16] for run in upcoming} == {"03:00"}

        # Run one now: the served process picks it up and runs the whole flow.
        httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json={}).raise_for_status()
        wait_for(lambda: runs("COMPLETED") or runs("FAILED") or runs("CRASHED"), PATIENCE, "the triggered run")
        assert runs("COMPLETED"), served.stdout
        promotion = json.loads((dvc_project / "reports/tabular/promotion.json").read_text())
        assert promotion["promoted"] and promotion["version"] == 1
    finally:
        for proc in (served, server):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


@pytest.mark.parametrize("cron", ["61 * * *", "every monday", ""])
def test_a_bad_cron_is_one_line_and_exit_2_before_anything_starts(cron, capsys, monkeypatch):
    from pipelines.deploy import main

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens: it must not get that far
    assert main(["--cron", cron]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --cron {cron!r}: not a cron schedule") and "\n" not in err


@pytest.mark.parametrize("user_value, expected", [(None, 180.0), ("45", 45.0)])
def test_the_flow_waits_for_a_first_start_of_prefects_temporary_server(user_value, expected):
    """A first start migrates a new database: about 19 s on an idle 2-core machine, against
    Prefect's own 20 s wait (a loaded CI machine timed out). Importing the flow, as
    `python -m pipelines.retrain` does, raises the wait before prefect reads its settings;
    a value the user exported wins."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    if user_value is not None:
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = user_value
    probe = ("import pipelines.retrain\n"
             "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as wait\n"
             "print(wait.value())")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert float(out.stdout.split()[-1]) == expected
