"""The model as it is logged and registered: preprocessing baked in, raw inputs in.

The promotion gate re-scores the champion on the current test split. A champion trained on
other preprocessing statistics must still see its own, so every registered model carries
them: a tabular model takes raw feature rows (NaN allowed) and imputes and scales itself; an
image model takes uint8 images (N, C, H, W) at the prepared size and normalises them itself; a
forecaster takes windows (N, input steps, features) in original units and returns forecasts
(N, horizon) in the target's original units.
"""

from __future__ import annotations

import numpy as np
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


def serving_model(net: nn.Module, meta: dict) -> nn.Module:
    """Wrap a trained network with the preprocessing described in prepared `meta`."""
    if meta["family"] == "tabular":
        return nn.Sequential(TabularPreprocess(meta["fill"], meta["mean"], meta["std"]), net).eval()
    if meta["family"] == "image":
        return nn.Sequential(ImagePreprocess(meta["mean"], meta["std"]), net).eval()
    if meta["family"] == "sequence":
        t = meta["target_index"]
        return nn.Sequential(Scale(meta["offset"], meta["scale"]), net,
                             Scale(meta["offset"][t], meta["scale"][t], inverse=True)).eval()
    raise ValueError(f"no serving wrapper for family {meta['family']!r}")


def example_input(meta: dict) -> np.ndarray:
    """Two valid raw inputs (for the logged signature and input example)."""
    if meta["family"] == "tabular":
        return np.array([meta["mean"], meta["fill"]], dtype=np.float32)
    if meta["family"] == "image":  # a black image and one of the training mean colour
        mean = np.round(np.array(meta["mean"]) * 255).astype(np.uint8)
        flat = np.broadcast_to(mean[:, None, None], meta["input_shape"])
        return np.stack([np.zeros(meta["input_shape"], np.uint8), flat])
    if meta["family"] == "sequence":  # the training mean, and one scale above it
        offset, scale = np.array(meta["offset"]), np.array(meta["scale"])
        return np.stack([np.broadcast_to(v, meta["input_shape"]) for v in (offset, offset + scale)]).astype(np.float32)
    raise ValueError(f"no example input for family {meta['family']!r}")


def input_description(meta: dict) -> str:
    """What the served model takes, compared before scoring a champion on this data."""
    if meta["family"] == "tabular":
        return "features: " + ", ".join(meta["features"])
    if meta["family"] == "image":
        c, h, w = meta["input_shape"]
        return f"images: uint8 {c}x{h}x{w} ({meta['channels']}); classes: " + ", ".join(meta["classes"])
    if meta["family"] == "sequence":
        steps, features = meta["input_shape"]
        return (f"windows: float32 {steps}x{features} ({', '.join(meta['inputs'])}) every {meta['frequency']}; "
                f"forecast: {meta['window']['horizon']} steps of {meta['target']}")
    raise ValueError(f"no input description for family {meta['family']!r}")
