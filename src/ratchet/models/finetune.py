"""Fine-tuning: start from a trained model, freeze named layers, replace the head.

`train.init_from` names where the starting weights come from:

- `models:/<name>@<alias>` or `models:/<name>/<version>`: a registered model; the weights are
  the `checkpoint/model.pt` its training run logged;
- a path to a `model.pt` written by the train stage.

Every parameter whose name and shape match the new network is copied. A head whose class count
differs does not match and keeps its fresh initialisation, so training on a new set of classes
replaces it. `train.freeze` lists module names (`features`, `features.0`, `classifier.0`, ...)
whose parameters then stay fixed; their BatchNorm statistics stay fixed too (the trainer keeps
them in eval mode).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ratchet.errors import RatchetError

CHECKPOINT_ARTIFACT = "checkpoint/model.pt"


def load_initial_weights(net: nn.Module, source: str, model_name: str, root: Path,
                         check: Callable[[dict], None] = lambda saved_model_cfg: None) -> list[str]:
    """Copy matching weights from `source` into `net`; return the names left as initialised.
    `check(saved model config)` refuses weights that load but mean something else (the
    family's `check_init_from`)."""
    saved = _read(source, root)
    saved_name = saved.get("config", {}).get("model", {}).get("name")
    if saved_name is not None and saved_name != model_name:
        raise RatchetError(f"train.init_from {source}: it is a '{saved_name}' model; model.name is '{model_name}'")
    check(saved.get("config", {}).get("model", {}))
    own = net.state_dict()
    matching = {k: v for k, v in saved["model"].items() if k in own and own[k].shape == v.shape}
    if not any(k in matching for k, _ in net.named_parameters()):
        raise RatchetError(f"train.init_from {source}: no parameter matches this network "
                           "(another architecture or input size?)")
    net.load_state_dict(matching, strict=False)
    return sorted(k for k in own if k not in matching)


def freeze(net: nn.Module, names: list[str]) -> int:
    """Stop gradients for the parameters of the named modules; return how many were frozen."""
    modules = dict(net.named_modules())
    count = 0
    for name in names:
        if name not in modules or not name:
            top = ", ".join(n for n, _ in net.named_children())
            raise RatchetError(f"train.freeze: this network has no module '{name}' (top-level modules: {top})")
        for p in modules[name].parameters():
            p.requires_grad_(False)
            count += p.numel()
    if names and not any(p.requires_grad for p in net.parameters()):
        raise RatchetError(f"train.freeze {names}: every parameter would be frozen; nothing left to train")
    return count


def _read(source: str, root: Path) -> dict:
    if source.startswith("models:/"):
        return _from_registry(source, root)
    path = Path(source) if Path(source).is_absolute() else root / source
    if not path.is_file():
        raise RatchetError(f"train.init_from {source}: file not found ({path})")
    return _load(path, source)


def _from_registry(uri: str, root: Path) -> dict:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from ratchet.tracking.runs import use_tracking

    use_tracking(root)
    client = MlflowClient()
    ref = uri.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, number = ref.split("/", 1)
            version = client.get_model_version(name, number)
        else:
            raise RatchetError(f"train.init_from {uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=CHECKPOINT_ARTIFACT,
                                                       dst_path=tmp)
            return _load(Path(path), uri)
    except MlflowException as exc:
        raise RatchetError(f"train.init_from {uri}: {str(exc).splitlines()[0]}") from None


def _load(path: Path, source: str) -> dict:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise RatchetError(f"train.init_from {source}: not a model.pt from the train stage ({exc})") from None
    if not isinstance(saved, dict) or "model" not in saved:
        raise RatchetError(f"train.init_from {source}: not a model.pt from the train stage (no 'model' weights)")
    return saved
