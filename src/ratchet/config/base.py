"""Sections every family shares: paths, training, evaluation, promotion."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, model_validator


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


CRON_FIELD = re.compile(r"[0-9A-Za-z*/,?#-]+")


def _cron(value: str) -> str:
    fields = value.split()
    if len(fields) != 5 or not all(CRON_FIELD.fullmatch(f) for f in fields):
        raise ValueError("not a cron schedule (five fields: minute hour day-of-month month day-of-week, "
                         "e.g. '0 3 * * 1')")
    return " ".join(fields)


class ScheduleConfig(Section):
    cron: Annotated[str, AfterValidator(_cron)] = Field(
        "0 3 * * 1", description="when the deployment retrains (`make team-up`, pipelines/deploy.py), cron syntax")
    pipelines: list[str] = Field([], description="which pipelines a scheduled run retrains; []: all")


class NumericsConfig(Section):
    mode: Literal["portable", "fast"] = Field(
        "portable", description="portable: every stage pins the CPU's numeric kernels (AVX2 kernels in oneDNN, MKL "
                                "and ATen, `threads` threads, deterministic algorithms), so any x86-64 machine with "
                                "AVX2 or better computes bitwise the same weights and metrics; fast: this CPU's "
                                "fastest kernels and all its cores, results reproduce on the same CPU model only")
    threads: int = Field(2, ge=1, le=256, description="portable: intra-op threads per process (results depend on the "
                                                     "count, so it is fixed, not the machine's core count)")


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


class TrainConfig(Section):
    out_dir: ProjectPath = Field(description="best model (model.pt), per-epoch history.csv, run.json")
    checkpoint: ProjectPath = Field(description="resume checkpoint; exists only while a training is unfinished")
    epochs: int = Field(20, ge=1, description="maximum number of epochs")
    batch_size: int = Field(64, ge=1, description="global batch size, split evenly over the processes")
    nproc: int = Field(1, ge=1, description="processes (devices) per node; 1 runs without torchrun")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu")
    monitor: str = Field("val_loss", description="validation metric for early stopping, plateau and best model "
                                                  "(the family lists its choices)")
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    grad_clip: float | None = Field(None, gt=0, description="max global gradient norm; null: no clipping")
    amp: bool = Field(True, description="mixed precision (bf16 autocast) on CUDA; ignored on CPU")
    sync_batchnorm: bool = Field(True, description="BatchNorm statistics over the global batch when nproc > 1")
    init_from: str | None = Field(
        None, description="fine-tune: start from models:/<name>@<alias>, models:/<name>/<version> or a model.pt"
    )
    freeze: list[str] = Field([], description="fine-tune: module names whose parameters stay fixed, e.g. [features]")
    system_metrics: bool = Field(False, description="log CPU, memory, disk and network usage (and GPU, with "
                                                    "nvidia-ml-py) into the MLflow run every 10 s")

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        if self.batch_size % self.nproc:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by nproc {self.nproc}")
        return self


class ClassifierTrainConfig(TrainConfig):
    """Training of a classifier: TrainConfig plus what imbalanced classes need."""

    class_weights: Literal["none", "balanced"] = Field(
        "none", description="balanced: weight each class's loss by n / (classes x its training count), so rare "
                            "classes count as much as common ones (logged as class_weight.<class>)")
    sampler: Literal["shuffle", "balanced"] = Field(
        "shuffle", description="shuffle: every training sample once per epoch; balanced: draw each epoch's "
                               "samples with replacement, every class equally likely")


class EvaluateConfig(Section):
    out_dir: ProjectPath = Field(description="classification report, confusion matrix, predictions.csv")
    metrics: ProjectPath = Field(description="metrics.json for `dvc metrics` (kept in git, outside out_dir)")
    plots: ProjectPath = Field(description="folder for `dvc plots show`: history.csv and every PNG of training and "
                                           "evaluation (kept in git, outside out_dir)")
    nproc: int = Field(1, ge=1, description="processes for evaluation; each test sample is counted once")
    batch_size: int = Field(1024, ge=1, description="samples per forward pass")


class PromoteConfig(Section):
    registered_model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="MLflow registry name")
    metric: str = Field("f1_macro", description="test metric the gate compares (the family lists its choices)")
    direction: Literal["maximize", "minimize"] = Field("maximize", description="which way is better")
    min_delta: float = Field(0.0, ge=0, description="the new model must beat the champion by more than this")
    min_samples: int = Field(30, ge=1, description="when test samples are left out as a model's training data, "
                                                  "the fewest that must remain; fewer refuses the promotion")
    out: ProjectPath = Field(description="promotion.json: the decision and its reason")


LOWER_IS_BETTER = ("loss", "mse", "mae", "rmse")


def monitor_mode(name: str) -> str:
    """'min' for losses and errors (a metric name ending in loss, mse, mae or rmse), 'max' for
    everything else (accuracy, F1, precision, recall): the naming rule every family follows."""
    return "min" if name.endswith(LOWER_IS_BETTER) else "max"


def check_metric_names(train: TrainConfig, promote: PromoteConfig, monitors: tuple[str, ...],
                       metrics: tuple[str, ...]) -> None:
    """Refuse a monitor or promotion metric the family does not compute, and a direction that
    would promote the worse model: a ValueError `key: message (got value)`."""
    if train.monitor not in monitors:
        raise ValueError(f"train.monitor: this family computes {', '.join(monitors)} (got {train.monitor!r})")
    if promote.metric not in metrics:
        raise ValueError(f"promote.metric: this family computes {', '.join(metrics)} (got {promote.metric!r})")
    wanted = "maximize" if monitor_mode(promote.metric) == "max" else "minimize"
    if promote.direction != wanted:
        raise ValueError(f"promote.direction: {promote.metric} is {'higher' if wanted == 'maximize' else 'lower'}"
                         f"-is-better; set {wanted} (got {promote.direction!r})")


class CsvData(Section):
    """Where a family's CSV data is and how to read it (tabular and sequence share it).

    One file: `source` is the CSV. Separate files (a given test file, a given validation file):
    `source` is the folder holding them and `train`, `test`, `val` name files under it, so that
    DVC, which tracks `source`, sees a change to any of them."""

    source: ProjectPath = Field(description="the CSV file; or, with data.train set, the folder holding the files")
    train: str | None = Field(None, description="training CSV under the source folder; null: source is the CSV")
    val: str | None = Field(None, description="validation CSV under the source folder (needs data.train); "
                                              "null: the last or a stratified share of the training file")
    test: str | None = Field(None, description="test CSV under the source folder (needs data.train); "
                                               "null: held out from the training file")
    columns: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="column names for CSVs without a header row (every file then has none); "
                          "null: the first row is the header")
    delimiter: str = Field(",", min_length=1, max_length=1, description="field separator, e.g. ';' or '\\t'")

    @model_validator(mode="after")
    def _files(self) -> CsvData:
        for key in ("val", "test"):
            if getattr(self, key) is not None and self.train is None:
                raise ValueError(f"{key}: separate files need data.train as well: data.source is then the folder "
                                 f"holding them, e.g. source: data/water, train: water_train.csv, "
                                 f"{key}: water_{key}.csv (so DVC tracks every file)")
        for key in ("train", "val", "test"):
            name = getattr(self, key)
            if name is not None and (Path(name).is_absolute() or ".." in Path(name).parts):
                raise ValueError(f"{key}: {name!r} must be a path under data.source (DVC tracks data.source)")
        names = [n for n in (self.train, self.val, self.test) if n is not None]
        if len(set(names)) < len(names):
            raise ValueError(f"train, val and test name the same file ({', '.join(names)})")
        if self.columns is not None and len(set(self.columns)) < len(self.columns):
            repeated = next(c for c in self.columns if self.columns.count(c) > 1)
            raise ValueError(f"columns: {repeated!r} appears more than once")
        return self

    def file(self, split: str) -> Path | None:
        """The CSV of `split` ('train', 'val' or 'test'), None when it is held out of the training file."""
        if split == "train":
            return self.source if self.train is None else self.source / self.train
        name = getattr(self, split)
        return None if name is None else self.source / name
