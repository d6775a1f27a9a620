"""The course MLP: Linear -> [BatchNorm] -> activation -> [Dropout] blocks, then a linear head.

Used for tabular rows and, flattened, for images (an MLP on pixels).
"""

from __future__ import annotations

from torch import nn

from ratchet.config import MLPConfig

ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU}


class MLP(nn.Sequential):
    def __init__(self, in_features: int, num_outputs: int, cfg: MLPConfig):
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for hidden in cfg.hidden:
            # BatchNorm subtracts the batch mean, so a bias before it does nothing but drift on
            # rounding noise (which Adam scales up to full-size steps): leave it out.
            layers.append(nn.Linear(width, hidden, bias=not cfg.batchnorm))
            if cfg.batchnorm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(ACTIVATIONS[cfg.activation]())
            if cfg.dropout:
                layers.append(nn.Dropout(cfg.dropout))
            width = hidden
        layers.append(nn.Linear(width, num_outputs))
        super().__init__(*layers)
        init_linear(self, cfg.init, cfg.activation)


def init_linear(module: nn.Module, scheme: str, activation: str) -> None:
    """He (Kaiming) or Xavier init of every Linear/Conv weight, zero biases; 'default' keeps torch's.

    Both are scaled for the activation (ELU uses ReLU's gain, tanh its own); leaky_relu uses slope 0.01.
    """
    if scheme == "default":
        return
    nonlinearity, slope = {"leaky_relu": ("leaky_relu", 0.01), "tanh": ("tanh", 0.0)}.get(activation, ("relu", 0.0))
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if scheme == "he":
                nn.init.kaiming_normal_(m.weight, a=slope, nonlinearity=nonlinearity)
            else:
                nn.init.xavier_uniform_(m.weight, gain=nn.init.calculate_gain(nonlinearity, slope))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
