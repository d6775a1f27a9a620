"""The sequence family: a time-series CSV (a timestamp column and value columns) forecast from
sliding windows."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ratchet.config.base import CsvData, EvaluateConfig, ProjectPath, PromoteConfig, Section, TrainConfig
from ratchet.config.models import SequenceModelConfig


class SequenceData(CsvData):
    """The series: one CSV (`source`), or a folder with `train`, and optionally later `val` and
    `test` files (see CsvData)."""

    timestamp: str = Field("timestamp", min_length=1, description="name of the timestamp column")
    target: str = Field(min_length=1, description="the value column to forecast")
    features: list[str] | None = Field(None, description="value columns the model reads; null: the target alone")
    frequency: str | None = Field(None, description="step between rows as a pandas frequency: a fixed one (15min, "
                                                    "1h, 1D) or a calendar one (B business days, W-SUN, MS/ME "
                                                    "month start/end, QS, YS); null: inferred from the timestamps")
    unsorted: Literal["sort", "fail"] = Field("sort", description="rows out of time order: sort them, or stop")
    duplicates: Literal["fail", "first", "mean"] = Field(
        "fail", description="repeated timestamps: stop, keep the first row, or average them")
    gaps: Literal["fail", "ffill", "interpolate"] = Field(
        "fail", description="missing steps or values: stop, carry the last value forward, or interpolate in time")

    @property
    def inputs(self) -> list[str]:
        return list(self.features) if self.features else [self.target]


class SequencePrepare(Section):
    out_dir: ProjectPath = Field(description="directory of the prepared series and meta.json")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="last share of the training file before the test "
                                                                "part, for validation, when data.val is null")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="last share of the training file for test, "
                                                                 "when data.test is null")
    scaler: Literal["standard", "minmax", "none"] = Field(
        "standard", description="per-column scaling fitted on the training part only")


class WindowConfig(Section):
    input: int = Field(48, ge=1, description="time steps the model reads")
    horizon: int = Field(1, ge=1, description="time steps it forecasts, right after the input")
    stride: int = Field(1, ge=1, description="steps between the starts of consecutive training windows; "
                                                     "validation and test use every window")


class SequenceEvaluate(EvaluateConfig):
    seasonal_period: int | None = Field(
        None, ge=1, description="steps per season for the seasonal-naive baseline (96 for a day of 15-minute "
                                "steps); null: last-value baseline only")
    plot_steps: int = Field(672, ge=10, description="test steps shown in forecast.png")


class SequencePipeline(Section):
    family: Literal["sequence"]
    seed: int = Field(42, ge=0, le=2**31 - 1, description="seeds the weight init, dropout and the batch order")
    data: SequenceData
    prepare: SequencePrepare
    window: WindowConfig = WindowConfig()
    model: SequenceModelConfig
    train: TrainConfig
    evaluate: SequenceEvaluate
    promote: PromoteConfig

    @model_validator(mode="after")
    def _consistent(self) -> SequencePipeline:
        if self.data.timestamp in self.data.inputs:
            raise ValueError(f"data.features: {self.data.timestamp} is the timestamp column")
        if self.data.features and self.data.target not in self.data.features:
            raise ValueError(f"data.features: must include the target {self.data.target}")
        period = self.evaluate.seasonal_period
        if period is not None and period > self.window.input:
            raise ValueError(f"evaluate.seasonal_period {period} is longer than window.input {self.window.input}: "
                             "the seasonal-naive forecast needs a whole season inside the window")
        return self
