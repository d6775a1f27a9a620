"""The multihead family: two-level image trees (`<source>/<group>/<class>/<image>`, e.g. Omniglot's
alphabet/character), a network with several inputs (the image, and optionally the group) and
several heads (the class, and optionally the group), each head with its loss weight."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ratchet.config.base import ClassifierTrainConfig, EvaluateConfig, PromoteConfig, Section
from ratchet.config.image import AugmentConfig, ImageData, ImagePrepare

Input = Literal["image", "group"]
Head = Literal["group", "class"]


class MultiheadModelConfig(Section):
    """The course's networks: an image branch of conv 3x3 -> [BatchNorm] -> max-pool 2x2 ->
    activation blocks, flattened to a `hidden`-wide embedding; with `inputs: [image, group]` a
    group branch (one-hot -> `group_hidden` -> activation) joins it; each head is a linear layer
    (the class head reads both branches, the group head the image branch)."""

    name: Literal["cnn"] = Field("cnn", description="the multi-input / multi-output CNN")
    inputs: list[Input] = Field(["image"], min_length=1, description="what the network reads: [image] or [image, group]")
    heads: dict[Head, Annotated[float, Field(gt=0)]] = Field(
        {"class": 1.0}, min_length=1, description="heads it predicts and their loss weights, e.g. {group: 0.3, class: 1.0}")
    channels: list[Annotated[int, Field(ge=1)]] = Field([16], min_length=1, description="filters per conv block")
    hidden: int = Field(128, ge=1, description="width of the image embedding")
    group_hidden: int = Field(8, ge=1, description="width of the group branch (inputs with group)")
    activation: Literal["relu", "elu", "leaky_relu"] = Field("elu", description="activation after each block")
    batchnorm: bool = Field(False, description="BatchNorm2d after each convolution")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the embedding, before the heads")
    init: Literal["he", "xavier", "default"] = Field(
        "default", description="weight init of the conv and linear layers; default (torch's, as the course) "
                               "generalised better on Omniglot than he (BENCHMARKS.md)")

    @model_validator(mode="after")
    def _inputs_and_heads(self) -> MultiheadModelConfig:
        if "image" not in self.inputs:
            raise ValueError("inputs: must include image")
        if len(set(self.inputs)) != len(self.inputs):
            raise ValueError(f"inputs: {self.inputs} names an input twice")
        if "group" in self.inputs and "group" in self.heads:
            raise ValueError("heads: group is also an input; a network that reads the group cannot predict it")
        return self


class MultiheadPipeline(Section):
    family: Literal["multihead"]
    seed: int = Field(42, ge=0, le=2**31 - 1, description="seeds the split, the weight init, dropout, batch order and augmentation")
    data: ImageData
    prepare: ImagePrepare
    augment: AugmentConfig = AugmentConfig()
    model: MultiheadModelConfig = MultiheadModelConfig()
    train: ClassifierTrainConfig
    evaluate: EvaluateConfig
    promote: PromoteConfig

    @model_validator(mode="after")
    def _names_a_head(self) -> MultiheadPipeline:
        heads = set(self.model.heads)
        for key, value in (("train.monitor", self.train.monitor), ("promote.metric", self.promote.metric)):
            head = next((h for h in ("group", "class") if value.startswith((f"val_{h}_", f"val_loss_{h}", f"{h}."))),
                        None)
            if head is not None and head not in heads:
                raise ValueError(f"{key}: {value} follows the {head} head, which model.heads does not have "
                                 f"(heads: {', '.join(self.model.heads)})")
        return self
