"""Preprocessing layers of the model as it is logged and registered: raw inputs in.

Each family's `serving_model` hook puts its network behind the layers its data needs.

The promotion gate re-scores the champion on the current test split. A champion trained on
other preprocessing statistics must still see its own, so every registered model carries
them: a tabular model takes raw feature rows (NaN allowed) and imputes and scales itself; an
image model takes uint8 images (N, C, H, W) at the prepared size and normalises them itself; a
forecaster takes windows (N, input steps, features) in original units and returns forecasts
(N, horizon) in the target's original units.
"""

from __future__ import annotations

import torch
from torch import nn


class TabularPreprocess(nn.Module):
    """Impute NaN with the training fill values, then standardise with training mean/std."""

    def __init__(self, fill: list[float], mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("fill", torch.tensor(fill, dtype=torch.float32))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.where(torch.isnan(x), self.fill, x) - self.mean) / self.std


class ImagePreprocess(nn.Module):
    """uint8 pixels -> [0, 1] -> (x - mean) / std per channel, with the training statistics."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - self.mean) / self.std


class Scale(nn.Module):
    """(x - offset) / scale along the last dimension, or the inverse with `inverse=True`."""

    def __init__(self, offset: list[float] | float, scale: list[float] | float, inverse: bool = False):
        super().__init__()
        self.inverse = inverse
        self.register_buffer("offset", torch.tensor(offset, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.offset if self.inverse else (x - self.offset) / self.scale
