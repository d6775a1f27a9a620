"""The model registry and the promotion gate.

A new version takes `@champion` only when it beats the current champion, both scored on the
same test split now, by the configured metric, direction and margin. The decision and its
reason are tagged on the version.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from ratchet.errors import RatchetError

CHAMPION = "champion"
FEATURES_TAG = "ratchet.input"  # what the model takes as input, to refuse comparing unlike models


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
    """Register the run's model, once: asked again for the same run and model, it returns the
    version it made before."""
    for version in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        if version.source == model_uri:
            return version
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


def _short(desc: str) -> str:
    return desc if len(desc) <= 120 else desc[:117] + "..."
