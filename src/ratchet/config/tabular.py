"""The tabular family: a CSV with one label column."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ratchet.config.base import ClassifierTrainConfig, CsvData, EvaluateConfig, PromoteConfig, ProjectPath, Section
from ratchet.config.models import MLPConfig


class TabularData(CsvData):
    label: str = Field(min_length=1, description="name of the label column (numbers or strings)")
    exclude: list[str] = Field([], description="columns to ignore, e.g. an id column")


class TabularPrepare(Section):
    out_dir: ProjectPath = Field(description="directory of the prepared arrays and meta.json")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="share of training rows for validation, "
                                                                "when data.val is null")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="share of rows for the test split, "
                                                                 "when data.test is null")
    impute: Literal["median", "mean", "drop"] = Field(
        "median", description="missing values: fill with the train-split median or mean, or drop those rows"
    )
    non_finite: Literal["fail", "impute"] = Field(
        "fail", description="inf, -inf and values beyond float32: stop naming the file, column and line, or "
                            "treat them as missing values (prepare.impute)")


class TabularPipeline(Section):
    family: Literal["tabular"]
    seed: int = Field(42, ge=0, le=2**31 - 1, description="seeds the split, the weight init, dropout and the batch order")
    data: TabularData
    prepare: TabularPrepare
    model: MLPConfig = MLPConfig()
    train: ClassifierTrainConfig
    evaluate: EvaluateConfig
    promote: PromoteConfig

    @model_validator(mode="after")
    def _fractions(self) -> TabularPipeline:
        val = 0 if self.data.val is not None else self.prepare.val_fraction
        test = 0 if self.data.test is not None else self.prepare.test_fraction
        if val + test >= 0.8:
            raise ValueError("prepare.val_fraction + prepare.test_fraction must leave at least 20% for training")
        return self
