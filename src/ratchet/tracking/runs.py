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


# MLflow exports the URIs it is given into os.environ (for child processes). Those values are
# ours, not a user's override, and must not pin a later project to this one's database.
_EXPORTED_DEFAULTS: dict[str, str] = {}


def _override(var: str) -> str | None:
    value = os.environ.get(var)
    return None if not value or value == _EXPORTED_DEFAULTS.get(var) else value


def use_tracking(root: Path) -> str:
    """Point MLflow tracking and registry at the project's database, unless MLFLOW_TRACKING_URI
    (and MLFLOW_REGISTRY_URI) say otherwise; return the tracking URI."""
    default = f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"
    uri = _override("MLFLOW_TRACKING_URI") or default
    registry = _override("MLFLOW_REGISTRY_URI") or uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry)  # explicitly: MLflow may keep the registry of an earlier URI
    for var, value in (("MLFLOW_TRACKING_URI", uri), ("MLFLOW_REGISTRY_URI", registry)):
        if value == default:
            _EXPORTED_DEFAULTS[var] = value
    return uri


# The MLflow UI opens an experiment in the view its kind names; without it, MLflow 3 guesses
# GenAI (traces, tokens). Ratchet's experiments train models.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(name: str, root: Path) -> str:
    """The experiment `name`, created on first use, of the model-training kind. With a local
    database its artifacts go to <project>/mlartifacts/<name> (MLflow's own default depends on
    the working directory)."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        for key, value in EXPERIMENT_KIND.items():
            if exp.tags.get(key) != value:  # made by an earlier version, or by hand
                MlflowClient().set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    local = mlflow.get_tracking_uri().startswith("sqlite:")
    return mlflow.create_experiment(name, tags=EXPERIMENT_KIND,
                                    artifact_location=(Path(root) / "mlartifacts" / name).as_uri() if local else None)


@contextmanager
def training_run(experiment: str, root: Path, run_id: str | None = None, tags: dict | None = None,
                 run_name: str | None = None, system_metrics: bool = False) -> Iterator[mlflow.ActiveRun]:
    """Start a run (or reopen `run_id`). It ends FINISHED, KILLED when interrupted (Ctrl-C,
    SIGTERM), or FAILED when the body raises: never left RUNNING by an error we can see.
    `system_metrics`: MLflow samples CPU, memory, disk and network (and GPU) usage into the run."""
    run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id(experiment, root),
                           tags=tags, run_name=None if run_id else run_name, log_system_metrics=system_metrics)
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


def tracked_run(out_dir: Path, root: Path, train_stage: str) -> dict:
    """run.json of the trained model, once its MLflow run and registered version are known to the
    tracking store in use. A model restored by DVC (its cache, a `git checkout`) after mlflow.db
    was deleted or replaced points at a run that store has never seen: say so in one line,
    naming `train_stage`, the DVC stage that trains it again."""
    run_info = read_run_file(out_dir)
    use_tracking(root)
    client = MlflowClient()
    where = f"{Path(out_dir) / RUN_FILE}: MLflow run {run_info['run_id']}"
    retrain = f"train again with `dvc repro --force {train_stage}`"
    try:
        client.get_run(run_info["run_id"])
        if run_info.get("registered_model") and run_info.get("version") is not None:
            client.get_model_version(run_info["registered_model"], str(run_info["version"]))
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        missing = "is not" if "Run with id" in exc.message else \
            f"is there but its model version {run_info['registered_model']} v{run_info['version']} is not"
        raise RatchetError(f"{where} {missing} in the tracking store {mlflow.get_tracking_uri()} (the model was "
                           f"trained against another store, or that store was deleted since); {retrain}") from None
    return run_info
