"""The model registry and the promotion gate.

A new version takes `@champion` only when it beats the current champion, both scored on the
same test split now, by the configured metric, direction and margin. The decision and its
reason are tagged on the version.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from ratchet.errors import RatchetError

CHAMPION = "champion"
FEATURES_TAG = "ratchet.input"  # what the model takes as input, to refuse comparing unlike models
FINGERPRINT_ARTIFACT = "fingerprint"  # run artifact folder: the sample keys of the data the model trained on
FINGERPRINT_FILE = "fingerprint.npy"


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    metric: str
    score: float
    champion_version: str | None
    champion_score: float | None


def decide(metric: str, score: float, champion: tuple[str, float] | None, direction: str, min_delta: float) -> Decision:
    """Promote when there is no champion, or when `score` beats it by more than `min_delta`."""
    if champion is None:
        return Decision(True, f"first model: no @{CHAMPION} yet ({metric} {score:.4f})", metric, score, None, None)
    version, best = champion
    gain = score - best if direction == "maximize" else best - score
    verdict = "better" if gain > min_delta else "not better"
    reason = (f"{metric} {score:.4f} vs champion v{version} {best:.4f} on the same test split: "
              f"{verdict} ({'+' if gain >= 0 else ''}{gain:.4f}, margin {min_delta:g}, {direction})")
    return Decision(gain > min_delta, reason, metric, score, version, best)


def champion_version(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None  # no such model yet, or no alias


def register(client: MlflowClient, name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> ModelVersion:
    """Register the run's model, once per run: asked again for the same run (a training resumed
    after a kill that followed its registration logs the model again), it returns the version it
    made before."""
    made = sorted(client.search_model_versions(f"name='{name}' and run_id='{run_id}'"), key=lambda v: int(v.version))
    if made:
        return made[0]
    version = mlflow.register_model(model_uri, name, tags=tags)
    return client.get_model_version(name, version.version)


def check_comparable(champion: ModelVersion, input_desc: str, name: str) -> None:
    """Refuse to compare with a champion trained on different inputs (another dataset)."""
    theirs = champion.tags.get(FEATURES_TAG)
    if theirs is not None and theirs != input_desc:
        raise RatchetError(
            f"registered model '{name}': champion v{champion.version} takes {_short(theirs)}, this data has "
            f"{_short(input_desc)}; set promote.registered_model to a new name for a new dataset"
        )


def record(client: MlflowClient, name: str, version: ModelVersion, decision: Decision) -> None:
    """Tag the decision on the version, and move the alias if promoted."""
    for key, value in asdict(decision).items():
        client.set_model_version_tag(name, version.version, f"ratchet.promotion.{key}", json.dumps(value) if not isinstance(value, str) else value)
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)


LOCK_SUFFIX = ".promotion-lock"
LOCK_STALE_SECONDS = 1800  # a lock older than this was left by a killed promotion: it is broken


@contextmanager
def promotion_lock(client: MlflowClient, name: str, wait: float = 900.0) -> Iterator[None]:
    """Serialize promotions of registered model `name`, across processes and machines: the lock
    is a registered model `<name>.promotion-lock`, created while a promotion reads the champion,
    scores and moves the alias, and deleted after. Creating a registered model that exists fails
    in the tracking store's database (SQLite, PostgreSQL, behind a server or not), so exactly one
    promotion holds it; a file lock would not serialize two machines sharing one server. A lock
    older than LOCK_STALE_SECONDS (its holder was killed) is broken; waiting longer than `wait`
    seconds is a one-line error naming the holder."""
    import os
    import socket
    import time

    lock = f"{name}{LOCK_SUFFIX}"
    owner = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + wait
    while True:
        try:
            client.create_registered_model(lock, tags={"ratchet.lock.owner": owner,
                                                       "ratchet.lock.since": f"{time.time():.3f}"},
                                           description=f"held while a promotion of '{name}' runs; deleted after")
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock)
        except MlflowException:
            continue  # released meanwhile: try again
        since = float(held.tags.get("ratchet.lock.since", "0") or 0)
        if time.time() - since > LOCK_STALE_SECONDS:
            with contextlib.suppress(MlflowException):
                client.delete_registered_model(lock)
            continue
        if time.monotonic() > deadline:
            raise RatchetError(f"registered model '{name}': another promotion ({held.tags.get('ratchet.lock.owner')}) "
                               f"has held its lock for {time.time() - since:.0f} s; waited {wait:.0f} s "
                               f"(a lock older than {LOCK_STALE_SECONDS} s is broken)")
        time.sleep(0.5)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock)


def fingerprint(version: ModelVersion):
    """The sorted uint64 keys of the samples (train and val) a registered version trained on, or
    None for a version registered without one."""
    import tempfile
    from pathlib import Path

    import numpy as np

    with tempfile.TemporaryDirectory(prefix="ratchet-fingerprint-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=version.run_id,
                                                       artifact_path=f"{FINGERPRINT_ARTIFACT}/{FINGERPRINT_FILE}",
                                                       dst_path=tmp)
        except (MlflowException, OSError):
            return None
        return np.load(Path(path), allow_pickle=False)


def load_served_model(client: MlflowClient, name: str, version: str):
    """The registered version's served network (an `nn.Module` on CPU), loaded without running
    code from the registry: only MLflow's pt2 format (torch.export, weights read as tensors) is
    accepted. A pickle-format version (`model.pth`, which unpickling would execute), a version
    that ships code, or one without a pytorch model is refused in one line naming it."""
    import tempfile
    from pathlib import Path

    import torch
    import yaml

    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    label = f"registered model '{name}' v{version}"
    with tempfile.TemporaryDirectory(prefix="ratchet-model-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp))
        except MlflowException as exc:
            raise RatchetError(f"{label}: cannot be read from the registry ({exc.message.splitlines()[0]})") from None
        try:
            flavor = (yaml.safe_load((local / "MLmodel").read_text()) or {}).get("flavors", {}).get("pytorch")
        except (OSError, yaml.YAMLError):
            flavor = None
        if not isinstance(flavor, dict):
            raise RatchetError(f"{label}: not a PyTorch model logged by MLflow (no pytorch flavor in its MLmodel)")
        if flavor.get("code"):
            raise RatchetError(f"{label}: ships code ({flavor['code']}) that loading would import; refusing it")
        data = local / str(flavor.get("model_data", "data"))
        if (data / "model.pth").exists() or not (data / "model.pt2").is_file():
            raise RatchetError(f"{label}: is in MLflow's pickle format, whose loading runs code stored in the "
                               "registry; refusing it (only pt2, torch.export's format, is loaded)")
        try:
            from mlflow.pytorch import _validate_pt2_archive_is_pickle_free  # MLflow's own check of the archive
        except ImportError:
            _validate_pt2_archive_is_pickle_free = None
        try:
            if _validate_pt2_archive_is_pickle_free is not None:
                _validate_pt2_archive_is_pickle_free(str(data / "model.pt2"))
        except MlflowException:
            raise RatchetError(f"{label}: its model.pt2 holds pickled objects, whose loading runs code; "
                               "refusing it") from None
        try:
            program = torch.export.load(str(data / "model.pt2"))
        except Exception as exc:  # a corrupt or foreign archive: one line, whatever torch raises
            raise RatchetError(f"{label}: model.pt2 does not load ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return program.module()


def _short(desc: str) -> str:
    return desc if len(desc) <= 200 else desc[:197] + "..."
