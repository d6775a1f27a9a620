"""Networks the families build from their `model` section: the MLP, the course CNN and LeNet-5,
recurrent forecasters; fine-tuning; the preprocessing wrappers of served models. Which network
a `model.name` means is the family's choice (families/<name>.py `build_model`)."""

from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
