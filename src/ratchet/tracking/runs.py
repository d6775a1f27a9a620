"""One MLflow run per training: started by the train stage, reopened by evaluate.

Tracking goes to `sqlite:///<project>/mlflow.db` unless MLFLOW_TRACKING_URI says otherwise.
One experiment per pipeline, named after it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import RunStatus

from ratchet.errors import RatchetError

RUN_FILE = "run.json"


def use_tracking(root: Path) -> str:
    """Point MLflow at the project's database (or MLFLOW_TRACKING_URI); return the URI."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return uri


@contextmanager
def training_run(experiment: str, run_id: str | None = None, tags: dict | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start a run (or reopen `run_id`). It ends FINISHED, KILLED when interrupted (Ctrl-C,
    SIGTERM), or FAILED when the body raises: never left RUNNING by an error we can see."""
    exp = mlflow.set_experiment(experiment)
    run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp.experiment_id, tags=tags,
                           log_system_metrics=False)
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


def mark_killed(run_id: str) -> None:
    """Close a run whose training was abandoned (its checkpoint no longer matches the config)."""
    client = MlflowClient()
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.KILLED))
    except mlflow.exceptions.MlflowException:
        pass  # the run was deleted, or lives in another tracking store: nothing to close


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """{'train': {'optimizer': {'lr': 0.1}}} -> {'train.optimizer.lr': '0.1'} for log_params."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)
    return flat


def numeric(values: dict, prefix: str = "") -> dict[str, float]:
    """The scalar entries of a metric dict, prefixed, as MLflow metrics."""
    return {f"{prefix}{k}": float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_run_file(out_dir: Path) -> dict:
    path = Path(out_dir) / RUN_FILE
    if not path.is_file():
        raise RatchetError(f"{path}: not found; run the train stage first")
    return json.loads(path.read_text())
