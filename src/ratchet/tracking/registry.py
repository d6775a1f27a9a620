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
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from ratchet.errors import RatchetError

CHAMPION = "champion"
# What a version takes as input, to refuse comparing unlike models: a digest of the family's
# input description (the description itself, column and class names, is the model's metadata;
# as a tag it would crowd the registry's view). Versions registered before kept it in full.
INPUT_TAG = "ratchet.input.sha256"
LEGACY_INPUT_TAG = "ratchet.input"
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


def input_digest(input_desc: str) -> str:
    import hashlib

    return hashlib.sha256(input_desc.encode()).hexdigest()[:16]


def check_comparable(champion: ModelVersion, input_desc: str, name: str) -> None:
    """Refuse to compare with a champion trained on different inputs (another dataset)."""
    digest, theirs = champion.tags.get(INPUT_TAG), champion.tags.get(LEGACY_INPUT_TAG)
    if digest is not None:
        if digest == input_digest(input_desc):
            return
        theirs = _described_input(name, champion.version)
    if theirs is not None and theirs != input_desc:
        raise RatchetError(
            f"registered model '{name}': champion v{champion.version} takes {_short(theirs)}, this data has "
            f"{_short(input_desc)}; set promote.registered_model to a new name for a new dataset"
        )


def _described_input(name: str, version: str) -> str:
    """The input description in a version's model metadata (what its signature's names mean)."""
    try:
        return mlflow.models.get_model_info(f"models:/{name}/{version}").metadata["ratchet"]["input"]
    except (MlflowException, KeyError, TypeError):
        return "other inputs"


def record(client: MlflowClient, name: str, version: ModelVersion, decision: Decision) -> None:
    """Tag the decision on the version, write its reason as the version's description (what the
    registry shows beside each version), and move the alias if promoted."""
    for key, value in asdict(decision).items():
        client.set_model_version_tag(name, version.version, f"ratchet.promotion.{key}",
                                     json.dumps(value) if not isinstance(value, str) else value)
    client.update_model_version(name, version.version,
                                description=f"{'Promoted' if decision.promoted else 'Not promoted'}: {decision.reason}")
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
    code from the registry (`served_program`)."""
    import tempfile

    from ratchet.serve.pt2 import load_program

    with tempfile.TemporaryDirectory(prefix="ratchet-model-") as tmp:
        return load_program(served_program(client, name, version, Path(tmp)), version_label(name, version))


def served_program(client: MlflowClient, name: str, version: str, dst: Path) -> Path:
    """The registered version's torch.export archive (`model.pt2`, weights read as tensors),
    downloaded into `dst` and checked to hold no pickled objects, from Ratchet's pyfunc model
    (ratchet.serve) or MLflow's pytorch pt2 flavor (versions registered before it). A
    pickle-format version (`model.pth`, which unpickling would execute), a version that ships
    code, or one without such an archive is refused in one line naming it."""
    import os

    import yaml

    from ratchet.serve.log import LOADER
    from ratchet.serve.pt2 import check_pickle_free
    from ratchet.serve.pyfunc import PROGRAM_FILE

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    label = version_label(name, version)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst)))
    except MlflowException as exc:
        raise RatchetError(f"{label}: cannot be read from the registry ({exc.message.splitlines()[0]})") from None
    try:
        flavors = (yaml.safe_load((local / "MLmodel").read_text()) or {}).get("flavors", {})
    except (OSError, yaml.YAMLError):
        flavors = {}
    pyfunc, torch_flavor = flavors.get("python_function") or {}, flavors.get("pytorch")
    if pyfunc.get("loader_module") == LOADER:
        if pyfunc.get("code"):
            raise RatchetError(f"{label}: ships code ({pyfunc['code']}) that loading would import; refusing it")
        program = local / str(pyfunc.get("data", "")) / PROGRAM_FILE
    elif isinstance(torch_flavor, dict):
        if torch_flavor.get("code"):
            raise RatchetError(f"{label}: ships code ({torch_flavor['code']}) that loading would import; "
                               "refusing it")
        data = local / str(torch_flavor.get("model_data", "data"))
        if (data / "model.pth").exists():
            raise RatchetError(f"{label}: is in MLflow's pickle format, whose loading runs code stored in the "
                               "registry; refusing it (only pt2, torch.export's format, is loaded)")
        program = data / PROGRAM_FILE
    else:
        raise RatchetError(f"{label}: not a PyTorch model logged by MLflow or Ratchet (no pt2 network in its "
                           "MLmodel)")
    if not program.is_file():
        raise RatchetError(f"{label}: has no {PROGRAM_FILE} (only pt2, torch.export's format, is loaded)")
    check_pickle_free(program, label)
    return program


def version_label(name: str, version: str | int) -> str:
    """How an error names a registered version."""
    return f"registered model '{name}' v{version}"


def _short(desc: str) -> str:
    return desc if len(desc) <= 200 else desc[:197] + "..."
