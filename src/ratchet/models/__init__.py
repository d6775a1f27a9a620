"""The table from a model name in params.yaml to its builder; sizes come from the prepared data."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from ratchet.errors import RatchetError
from ratchet.models.cnn import CNN, LeNet5
from ratchet.models.mlp import MLP
from ratchet.models.rnn import Forecaster

# name -> builder(model config, prepared meta) -> nn.Module: one logit per class, or one value per
# forecast step
BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": lambda cfg, meta: MLP(math.prod(meta["input_shape"]), len(meta["classes"]), cfg),
    "cnn": lambda cfg, meta: CNN(meta["input_shape"], len(meta["classes"]), cfg),
    "lenet5": lambda cfg, meta: LeNet5(meta["input_shape"], len(meta["classes"]), cfg),
    **{cell: lambda cfg, meta: Forecaster(meta["input_shape"][1], meta["window"]["horizon"], cfg,
                                                  meta["target_index"])
       for cell in ("rnn", "lstm", "gru")},
}


def build_model(cfg, meta: dict) -> nn.Module:
    """Build the network named by `cfg.name` for the data described by `meta`."""
    try:
        return BUILDERS[cfg.name](cfg, meta)
    except ValueError as exc:
        raise RatchetError(f"model.name {cfg.name}: {exc}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
