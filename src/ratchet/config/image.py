"""The image family: ImageFolder trees (`<root>/<class>/<image>`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from ratchet.config.base import ClassifierTrainConfig, EvaluateConfig, ProjectPath, PromoteConfig, Section
from ratchet.config.models import ImageModelConfig


class ImageData(Section):
    source: ProjectPath = Field(description="the dataset's folder (DVC tracks it as the prepare stage's input)")
    train: Path = Field(Path("."), description="ImageFolder tree of training images, relative to source")
    test: Path | None = Field(None, description="ImageFolder tree of test images, relative to source; "
                                                "null: split the test images off the training tree")
    channels: Literal["rgb", "grayscale"] = Field("rgb", description="colour mode every image is converted to")
    size: tuple[Annotated[int, Field(ge=8, le=4096)], Annotated[int, Field(ge=8, le=4096)]] = Field(
        (64, 64), description="[height, width] every image is resized to, in pixels"
    )
    on_bad_image: Literal["fail", "skip"] = Field(
        "fail", description="a file that does not decode: stop with its name, or skip it with a warning"
    )
    duplicates: Literal["fail", "drop", "keep"] = Field(
        "fail", description="a validation or test file byte-identical to a file of an earlier split (train, then "
                            "val): stop and say so, drop it from the evaluation split, or keep it with a warning")


class ImagePrepare(Section):
    out_dir: ProjectPath = Field(description="directory of the prepared uint8 arrays and meta.json")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="share of the training images for validation")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="share held out for test when data.test is null")


class AugmentConfig(Section):
    """Random changes to training batches, drawn per image from the seed; none at evaluation."""

    hflip: float = Field(0.0, ge=0, le=1, description="probability of a horizontal flip")
    rotation: float = Field(0.0, ge=0, le=180, description="rotation by up to +/- this many degrees")
    shear: float = Field(0.0, ge=0, lt=90, description="shear by up to +/- this many degrees")
    scale: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = Field(
        (1.0, 1.0), description="zoom factor drawn uniformly from [min, max]"
    )
    translate: float = Field(0.0, ge=0, lt=1, description="shift by up to this fraction of width and height")
    autocontrast: float = Field(0.0, ge=0, le=1, description="probability of stretching contrast to the full range")
    noise: float = Field(0.0, ge=0, le=1, description="std of Gaussian noise added, in units of the pixel range")

    @model_validator(mode="after")
    def _scale_order(self) -> AugmentConfig:
        if self.scale[0] > self.scale[1]:
            raise ValueError(f"scale [{self.scale[0]}, {self.scale[1]}]: min is larger than max")
        return self


class ImagePipeline(Section):
    family: Literal["image"]
    seed: int = Field(42, ge=0, le=2**31 - 1, description="seeds the split, the weight init, dropout, batch order and augmentation")
    data: ImageData
    prepare: ImagePrepare
    augment: AugmentConfig = AugmentConfig()
    model: ImageModelConfig
    train: ClassifierTrainConfig
    evaluate: EvaluateConfig
    promote: PromoteConfig
