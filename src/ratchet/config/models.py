"""Model sections: the `name` picks the builder in ratchet.models.BUILDERS."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from ratchet.config.base import Section

Activation = Literal["relu", "elu", "leaky_relu"]
Init = Literal["he", "xavier", "default"]


class MLPConfig(Section):
    name: Literal["mlp"] = Field("mlp", description="model builder, see ratchet.models.BUILDERS")
    hidden: list[Annotated[int, Field(ge=1)]] = Field([64, 32], min_length=1, description="hidden layer widths")
    activation: Activation = Field("relu", description="activation after each hidden layer")
    batchnorm: bool = Field(True, description="BatchNorm1d after each hidden linear layer")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout probability after each hidden layer")
    init: Init = Field("he", description="weight init of the linear layers")


class CNNConfig(Section):
    """The course CNN: blocks of conv (3x3, same padding) -> activation -> 2x2 max-pool, then a
    linear classifier."""

    name: Literal["cnn"]
    channels: list[Annotated[int, Field(ge=1)]] = Field([32, 64], min_length=1, description="filters per conv block")
    activation: Activation = Field("elu", description="activation after each convolution")
    batchnorm: bool = Field(False, description="BatchNorm2d after each convolution")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout before the classifier")
    init: Init = Field("he", description="weight init of the conv and linear layers")


class LeNetConfig(Section):
    """LeNet-5: conv 5x5 (6) -> pool -> conv 5x5 (16) -> pool -> 120 -> 84 -> classes."""

    name: Literal["lenet5"]
    activation: Literal["tanh", "relu", "elu"] = Field("relu", description="activation after each layer")
    pool: Literal["avg", "max"] = Field("max", description="subsampling: average (1998) or max pooling")
    init: Literal["he", "xavier", "default"] = Field("default", description="weight init")


ImageModelConfig = Annotated[CNNConfig | LeNetConfig | MLPConfig, Field(discriminator="name")]


class RNNConfig(Section):
    """A recurrent forecaster: stacked RNN / LSTM / GRU over the input window, then a linear head
    from the last hidden state to every step of the horizon."""

    name: Literal["rnn", "lstm", "gru"]
    hidden: int = Field(64, ge=1, description="hidden units per layer (and direction)")
    layers: int = Field(1, ge=1, le=16, description="stacked recurrent layers")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout between recurrent layers (needs layers > 1)")
    bidirectional: bool = Field(False, description="also read the window backwards")
    residual: bool = Field(False, description="forecast the change from the window's last target value: the "
                                              "network starts from the naive forecast and learns corrections")


SequenceModelConfig = Annotated[RNNConfig, Field(discriminator="name")]
