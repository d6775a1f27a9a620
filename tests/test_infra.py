"""infra/: the Kubernetes bundle renders (kubectl kustomize) and the Compose file resolves
(docker compose config) when those tools are on the machine; both are skipped otherwise. What
they render is checked for the things a night's retraining needs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renders_a_cronjob_that_keeps_dvc_state_and_an_mlflow_server_on_postgres():
    out = subprocess.run(["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", "infra/k8s"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout)}
    cron = docs[("CronJob", "ratchet-retrain")]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = cron["containers"][0]
    mounts = {m["mountPath"]: m.get("subPath") for m in container["volumeMounts"]}
    assert mounts["/app/.dvc/cache"] == "dvc-cache" and mounts["/app/state"] == "state"
    script = container["command"][-1]
    assert script.index("cp /app/state/dvc.lock dvc.lock") < script.index("python -m pipelines.retrain") \
        < script.index("mv /app/state/dvc.lock.tmp /app/state/dvc.lock")
    assert cron["volumes"][0]["persistentVolumeClaim"]["claimName"] == "ratchet-work"
    mlflow = docs[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    assert "--serve-artifacts" in mlflow["args"] and mlflow["envFrom"][0]["secretRef"]["name"] == "ratchet-mlflow-db"
    env = docs[next(k for k in docs if k[0] == "ConfigMap" and k[1].startswith("ratchet-env"))]["data"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and ("Service", "mlflow") in docs


def compose_available() -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not compose_available(), reason="docker compose not installed")
def test_compose_config_resolves_and_prefect_runs_the_project_image():
    out = subprocess.run(["docker", "compose", "-f", "infra/docker-compose.yml", "--env-file",
                          "infra/.env.example", "config", "--format", "json"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert services["prefect-server"]["image"] == services["trainer"]["image"] == "ratchet:latest"
    assert "EXTRA_PIP_PACKAGES" not in services["prefect-server"].get("environment", {})


def test_outside_git_lineage_records_the_commit_the_image_was_built_from(tmp_path, monkeypatch):
    from ratchet.tracking.lineage import COMMIT_ENV, git_state

    monkeypatch.delenv(COMMIT_ENV, raising=False)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)  # like the image: no commit
    assert git_state(tmp_path)["commit"] == "unknown"
    monkeypatch.setenv(COMMIT_ENV, "0123abcd")
    assert git_state(tmp_path)["commit"] == "0123abcd"
    dockerfile = (REPO / "infra/Dockerfile").read_text()
    assert "ARG GIT_COMMIT" in dockerfile and f"ENV {COMMIT_ENV}=${{GIT_COMMIT}}" in dockerfile
    assert os.environ.get(COMMIT_ENV) == "0123abcd"
