"""Typed, validated view of params.yaml; `load_params()` is the only reader of the raw YAML.

params.yaml holds one section per pipeline (its `family` picks the schema below) plus the
`demo` section. Every path is written once, relative to the directory of params.yaml, and
resolved to an absolute path here. A bad value fails with one line naming the file and the
dotted key, e.g. `params.yaml: tabular.train.optimizer.lr: must be greater than 0 (got -1)`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo
from pydantic import model_validator

from ratchet.errors import RatchetError


def _resolve(path: Path, info: ValidationInfo) -> Path:
    root = (info.context or {}).get("root")
    return path if path.is_absolute() or root is None else (Path(root) / path).resolve()


ProjectPath = Annotated[Path, AfterValidator(_resolve)]
"""A path in params.yaml: relative ones are taken from the directory holding params.yaml."""


class Section(BaseModel):
    """Base of every section: unknown keys are errors, values are immutable after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DemoConfig(Section):
    dir: ProjectPath = Field(Path("data/demo"), description="where `ratchet demo-data` writes the built-in datasets")


# ---------------------------------------------------------------- tabular data and model


class TabularData(Section):
    source: ProjectPath = Field(description="CSV file, one row per sample, a header row")
    label: str = Field(min_length=1, description="name of the label column (numbers or strings)")
    exclude: list[str] = Field([], description="columns to ignore, e.g. an id column")


class TabularPrepare(Section):
    out_dir: ProjectPath = Field(description="directory of the prepared arrays and meta.json")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="share of rows for validation")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="share of rows for the test split")
    impute: Literal["median", "mean", "drop"] = Field(
        "median", description="missing values: fill with the train-split median or mean, or drop those rows"
    )


class MLPConfig(Section):
    name: Literal["mlp"] = Field("mlp", description="model builder, see ratchet.models.BUILDERS")
    hidden: list[Annotated[int, Field(ge=1)]] = Field([64, 32], min_length=1, description="hidden layer widths")
    activation: Literal["relu", "elu", "leaky_relu"] = Field("relu", description="activation after each hidden layer")
    batchnorm: bool = Field(True, description="BatchNorm1d after each hidden linear layer")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout probability after each hidden layer")
    init: Literal["he", "xavier", "default"] = Field("he", description="weight init of the linear layers")


# ---------------------------------------------------------------- training, shared by families


class OptimizerConfig(Section):
    name: Literal["sgd", "adam", "adamw", "rmsprop", "adagrad"] = Field("adam", description="torch.optim algorithm")
    lr: float = Field(1e-3, gt=0, le=10, description="learning rate")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty (decoupled for adamw)")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum for sgd and rmsprop; ignored by the others")


class SchedulerConfig(Section):
    name: Literal["none", "step", "plateau", "cosine"] = Field("none", description="learning-rate schedule")
    step_size: int = Field(10, ge=1, description="step: epochs between decays")
    gamma: float = Field(0.1, gt=0, le=1, description="step: factor applied every step_size epochs")
    factor: float = Field(0.5, gt=0, lt=1, description="plateau: factor applied when the monitor stalls")
    patience: int = Field(2, ge=0, description="plateau: epochs without improvement before a decay")
    min_lr: float = Field(0.0, ge=0, description="plateau and cosine: lower bound of the learning rate")


class EarlyStoppingConfig(Section):
    patience: int | None = Field(5, ge=1, description="epochs without improvement before stopping; null: off")
    min_delta: float = Field(0.0, ge=0, description="smallest change of the monitor that counts as improvement")


Monitor = Literal["val_loss", "val_accuracy", "val_f1_macro"]


class TrainConfig(Section):
    out_dir: ProjectPath = Field(description="best model (model.pt), per-epoch history.csv, run.json")
    checkpoint: ProjectPath = Field(description="resume checkpoint; exists only while a training is unfinished")
    epochs: int = Field(20, ge=1, description="maximum number of epochs")
    batch_size: int = Field(64, ge=1, description="global batch size, split evenly over the processes")
    nproc: int = Field(1, ge=1, description="processes (devices) per node; 1 runs without torchrun")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu")
    monitor: Monitor = Field("val_loss", description="validation metric for early stopping, plateau and best model")
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    grad_clip: float | None = Field(None, gt=0, description="max global gradient norm; null: no clipping")
    amp: bool = Field(True, description="mixed precision (bf16 autocast) on CUDA; ignored on CPU")
    sync_batchnorm: bool = Field(True, description="BatchNorm statistics over the global batch when nproc > 1")

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        if self.batch_size % self.nproc:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by nproc {self.nproc}")
        return self


class EvaluateConfig(Section):
    out_dir: ProjectPath = Field(description="classification report, confusion matrix, predictions.csv")
    metrics: ProjectPath = Field(description="metrics.json for `dvc metrics` (kept in git, outside out_dir)")
    nproc: int = Field(1, ge=1, description="processes for evaluation; each test sample is counted once")
    batch_size: int = Field(1024, ge=1, description="samples per forward pass")


ClassificationMetric = Literal[
    "accuracy", "f1_macro", "f1_micro", "f1_weighted",
    "precision_macro", "precision_weighted", "recall_macro", "recall_weighted",
]


class PromoteConfig(Section):
    registered_model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="MLflow registry name")
    metric: ClassificationMetric = Field("f1_macro", description="test metric the gate compares")
    direction: Literal["maximize", "minimize"] = Field("maximize", description="which way is better")
    min_delta: float = Field(0.0, ge=0, description="the new model must beat the champion by more than this")
    out: ProjectPath = Field(description="promotion.json: the decision and its reason")


# ---------------------------------------------------------------- pipelines


class TabularPipeline(Section):
    family: Literal["tabular"]
    seed: int = Field(42, description="seeds the split, the weight init, dropout and the batch order")
    data: TabularData
    prepare: TabularPrepare
    model: MLPConfig = MLPConfig()
    train: TrainConfig
    evaluate: EvaluateConfig
    promote: PromoteConfig

    @model_validator(mode="after")
    def _fractions(self) -> TabularPipeline:
        if self.prepare.val_fraction + self.prepare.test_fraction >= 0.8:
            raise ValueError("prepare.val_fraction + prepare.test_fraction must leave at least 20% for training")
        return self


FAMILIES: dict[str, type[Section]] = {"tabular": TabularPipeline}
PipelineConfig = TabularPipeline


class Params(BaseModel):
    """The whole of params.yaml, validated."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    file: Path
    demo: DemoConfig
    pipelines: dict[str, PipelineConfig]

    @property
    def root(self) -> Path:
        return self.file.parent

    def pipeline(self, name: str) -> PipelineConfig:
        if name not in self.pipelines:
            known = ", ".join(self.pipelines) or "none"
            raise RatchetError(f"{self.file.name}: no pipeline '{name}' (pipelines: {known})")
        return self.pipelines[name]


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise RatchetError naming the file and key on bad input."""
    file = Path(path).resolve()
    if not file.is_file():
        raise RatchetError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RatchetError(f"{file.name}:{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise RatchetError(f"{file.name}: expected a mapping of sections at the top level")

    context = {"root": file.parent}
    demo = _validate(DemoConfig, raw.get("demo", {}), "demo", file, context)
    pipelines = {}
    for name, section in raw.items():
        if name == "demo":
            continue
        family = section.get("family") if isinstance(section, dict) else None
        if family not in FAMILIES:
            what = f"unknown family '{family}'" if family else "not a pipeline (it has no 'family' key)"
            raise RatchetError(f"{file.name}: {name}: {what}; families: {', '.join(FAMILIES)}")
        pipelines[name] = _validate(FAMILIES[family], section, name, file, context)
    return Params(file=file, demo=demo, pipelines=pipelines)


def _validate(model: type[BaseModel], raw: object, prefix: str, file: Path, context: dict) -> BaseModel:
    try:
        return model.model_validate(raw, context=context)
    except ValidationError as exc:
        raise RatchetError(f"{file.name}: {_describe(exc, prefix)}") from None


def _describe(exc: ValidationError, prefix: str) -> str:
    """The first error as `dotted.key: message (got value)`, with a count of any others."""
    err = exc.errors()[0]
    key = ".".join([prefix, *(str(p) for p in err["loc"])])
    kind = err["type"]
    if kind == "extra_forbidden":
        text = f"{key}: unknown key"
    elif kind == "missing":
        text = f"{key}: required key is missing"
    else:
        message = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
        got = "" if isinstance(err.get("input"), dict) else f" (got {err.get('input')!r})"
        text = f"{key}: {message}{got}"
    more = len(exc.errors()) - 1
    return text + (f" (and {more} more error{'s' if more > 1 else ''})" if more else "")


def config_hash(*sections: BaseModel | dict | str | int) -> str:
    """A short, stable hash of config sections (and other values), for matching checkpoints."""
    payload = [s.model_dump(mode="json") if isinstance(s, BaseModel) else s for s in sections]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
