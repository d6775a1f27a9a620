"""Best-model tracking and early stopping on one validation metric."""

from __future__ import annotations

import torch
from torch import nn


def copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the weights: `state_dict()` alone returns live references that the
    next optimizer step would overwrite."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class EarlyStopping:
    """Remembers the best epoch's weights; says stop after `patience` epochs without improvement."""

    def __init__(self, patience: int | None, min_delta: float, mode: str):
        self.patience, self.min_delta, self.mode = patience, min_delta, mode
        self.best: float | None = None
        self.best_epoch = 0
        self.bad_epochs = 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def step(self, value: float, model: nn.Module, epoch: int) -> bool:
        """Record epoch `epoch` (1-based); return True when training should stop."""
        if self.improved(value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            self.best_state = copy_state(model)
        else:
            self.bad_epochs += 1
        return self.patience is not None and self.bad_epochs >= self.patience

    def restore_best(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "best_state": self.best_state}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.bad_epochs, self.best_state = state["bad_epochs"], state["best_state"]
