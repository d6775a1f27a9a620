"""The course's multi-input / multi-output network, and its served form.

Multi-input (Omniglot: image + alphabet -> character): conv 3x3 (1 -> 16) -> max-pool ->
ELU -> flatten -> Linear(16*32*32 -> 128) for the image, Linear(alphabets -> 8) -> ELU for the
one-hot alphabet, concatenated -> Linear(136 -> characters). Multi-output (image -> alphabet and
character): the same image branch feeding one linear head per output. Here both are one
network configured by `model.inputs` and `model.heads`; like the CNN it pools before its
(monotone) activation, the same function with less work.
"""

from __future__ import annotations

import torch
from torch import nn

from ratchet.config.multihead import MultiheadModelConfig
from ratchet.models.cnn import ACTIVATIONS, _flat_width
from ratchet.models.mlp import init_linear


class MultiHeadNet(nn.Module):
    """{'image': (N, C, H, W) float[, 'group': (N,) int64]} -> {head: (N, outputs) logits}."""

    def __init__(self, input_shape: list[int], groups: int, outputs: dict[str, int], cfg: MultiheadModelConfig):
        super().__init__()
        act = ACTIVATIONS[cfg.activation]
        layers: list[nn.Module] = []
        in_channels = input_shape[0]
        for out_channels in cfg.channels:
            layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=not cfg.batchnorm))
            if cfg.batchnorm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers += [nn.MaxPool2d(kernel_size=2), act()]
            in_channels = out_channels
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Linear(_flat_width(self.features, input_shape), cfg.hidden),
                                   *([nn.Dropout(cfg.dropout)] if cfg.dropout else []))
        self.groups = groups
        self.reads_group = "group" in cfg.inputs
        self.group = nn.Sequential(nn.Linear(groups, cfg.group_hidden), act()) if self.reads_group else None
        width = {"class": cfg.hidden + (cfg.group_hidden if self.reads_group else 0), "group": cfg.hidden}
        # keys "to_<head>": "class" is a Python keyword, and the traced (exported) graph names modules by key
        self.heads = nn.ModuleDict({f"to_{head}": nn.Linear(width[head], outputs[head]) for head in cfg.heads})
        init_linear(self, cfg.init, cfg.activation)

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image = self.embed(self.features(x["image"]))
        joint = image
        if self.group is not None:
            one_hot = nn.functional.one_hot(x["group"].long(), self.groups).to(image.dtype)
            joint = torch.cat([image, self.group(one_hot)], dim=1)
        return {key.removeprefix("to_"): layer(joint if key == "to_class" else image) for key, layer in self.heads.items()}


class ServedMultiHead(nn.Module):
    """The registered form: positional raw inputs in `inputs` order (uint8 images, int64 group
    indices), normalised with the training statistics, -> {head: logits}."""

    def __init__(self, net: nn.Module, inputs: list[str], preprocess: nn.Module):
        super().__init__()
        if list(inputs) not in (["image"], ["image", "group"]):
            raise ValueError(f"inputs {inputs}: the served model takes (image) or (image, group)")
        self.net, self.inputs, self.preprocess = net, list(inputs), preprocess

    def forward(self, image: torch.Tensor, group: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        # named parameters, not *args: torch.export (MLflow's format) traces each input by name
        x = {"image": self.preprocess(image)}
        if group is not None:
            x["group"] = group
        return self.net(x)
