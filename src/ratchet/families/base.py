"""The contract every model family implements; stages, the flow and promotion ask the family.

A family is one module in `ratchet/families/` holding a subclass of `Family` and an instance of
it named `FAMILY`, registered by name in `ratchet.families.FAMILIES`. Every hook below is
abstract: a family that leaves one out fails when params.yaml is loaded (never a silent
default). The family decides everything that differs between kinds of data and model:

- params: `schema` (the pydantic model of its pipeline section) and `monitors`/`gate_metrics`
  (the names `train.monitor` and `promote.metric` may take);
- prepare: `prepare` validates, splits and writes the prepared data, returning `meta`, a typed
  record (`Meta`) that train, evaluate and promote read back;
- train: `samples` (what the Trainer is fed: `(inputs, targets)`, each an array or a tuple/dict
  of arrays), `sample_weights` (a balanced sampler's draw weights), `transforms`, `memory_format`,
  `build_model`, `objective` (loss and validation metrics), `on_train_start` (extra
  artifacts), `check_init_from` (fine-tuning compatibility);
- evaluate: `evaluate` (test metrics, DDP-exact), `write_report`, `summary`;
- serve and promote: `serving_model`, `example_input`, `input_description`, `gate_data`,
  `sample_keys` (what the gate's overlap check compares), `score`; the registered model's named
  inputs and outputs (see ratchet.serve): `serving_spec`, `serving_signature`, `serving_example`,
  `frame_inputs`, `frame_outputs`, and `read_input` for `ratchet predict`.

Hooks import torch and friends inside their bodies: loading params (every stage does) imports
each family's module, and the prepare stage must not pay for torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # imported for annotations only: see the module doc
    import numpy as np
    import pandas as pd
    import torch
    from torch import nn

    from ratchet.data.prepared import Prepared
    from ratchet.train.distributed import DistInfo

from ratchet.config.base import monitor_mode  # noqa: F401  (re-exported: part of the contract)


class PreparedMeta(BaseModel):
    """What every family's meta.json says; each family extends it with its own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    family: str
    data_hash: str
    source: str
    serving_input: str  # the prepared array a registered model takes as its raw input
    input_shape: list[int]
    rows: dict[str, int]
    seed: int | None = None


class Family(ABC):
    """One kind of data and model; see the module doc. Subclasses set the class attributes."""

    name: ClassVar[str]
    schema: ClassVar[type[BaseModel]]  # the pipeline section in params.yaml
    Meta: ClassVar[type[PreparedMeta]]  # meta.json, as prepare writes it
    monitors: ClassVar[tuple[str, ...]]  # train.monitor choices (validation metrics, val_ prefix)
    gate_metrics: ClassVar[tuple[str, ...]]  # promote.metric choices (test metrics)

    def load(self, prepared_dir: Path) -> Prepared:
        """The prepared data this family's prepare wrote into `prepared_dir`."""
        from ratchet.data.prepared import load_prepared
        from ratchet.errors import RatchetError

        prepared = load_prepared(prepared_dir, self.Meta)
        if prepared.meta.family != self.name:
            raise RatchetError(f"{prepared_dir}: prepared for the {prepared.meta.family} family, not {self.name}; "
                               "run the prepare stage again")
        return prepared

    def new_model(self, model_cfg: Any, meta: PreparedMeta) -> nn.Module:
        """`build_model`, with a network that does not fit the data as a one-line error."""
        from ratchet.errors import RatchetError

        try:
            return self.build_model(model_cfg, meta)
        except ValueError as exc:
            raise RatchetError(f"model.name {model_cfg.name}: {exc}") from None

    # -- prepare ---------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, cfg: Any, root: Path) -> PreparedMeta:
        """Validate the raw data, split it, fit preprocessing on the training split, write
        `cfg.prepare.out_dir` atomically; return the record written as meta.json, whose paths
        are relative to the project folder `root` (`ratchet.data.prepared.project_path`)."""

    @abstractmethod
    def describe(self, meta: PreparedMeta) -> str:
        """What prepare made, for its log line (e.g. '2 classes')."""

    # -- train -----------------------------------------------------------------------------
    @abstractmethod
    def samples(self, cfg: Any, prepared: Prepared, split: str) -> tuple:
        """`(inputs, targets)` of a split, indexed by sample along the first dimension."""

    @abstractmethod
    def transforms(self, cfg: Any, meta: PreparedMeta, device: torch.device) -> tuple[Callable | None, Callable | None]:
        """(training, evaluation) transforms applied to each batch's inputs on the device."""

    @abstractmethod
    def memory_format(self, meta: PreparedMeta) -> torch.memory_format:
        """The layout the network is converted to (channels-last for convolutions)."""

    @abstractmethod
    def build_model(self, model_cfg: Any, meta: PreparedMeta) -> nn.Module:
        """The network named by `model_cfg.name`, sized for the prepared data."""

    @abstractmethod
    def objective(self, cfg: Any, meta: PreparedMeta, device: torch.device) -> tuple[Callable, Any]:
        """(loss, validation metrics): the loss returns a tensor, or `(total, {part: tensor})`;
        the metrics are a torchmetrics collection (or `MultitaskWrapper`) whose names, with a
        `val_` prefix, are the `monitors`."""

    @abstractmethod
    def sample_weights(self, cfg: Any, prepared: Prepared) -> np.ndarray | None:
        """Per training sample, its relative chance to be drawn (a balanced sampler draws each
        epoch with replacement by these); None: every sample once per epoch, shuffled."""

    @abstractmethod
    def on_train_start(self, cfg: Any, prepared: Prepared) -> None:
        """Log what a reader of the MLflow run should see of the training inputs (rank 0)."""

    @abstractmethod
    def check_init_from(self, saved_model_cfg: dict, cfg: Any, source: str) -> None:
        """Refuse fine-tuning weights that would load but mean something else here."""

    # -- evaluate --------------------------------------------------------------------------
    @abstractmethod
    def evaluate(self, cfg: Any, prepared: Prepared, net: nn.Module, dist: DistInfo) -> tuple[dict, list]:
        """(metrics.json's content, per-sample predictions gathered on every rank): each test
        sample counted once under DDP."""

    @abstractmethod
    def write_report(self, name: str, cfg: Any, prepared: Prepared, metrics: dict, predictions: list,
                     out: Path) -> None:
        """The report, predictions.csv and plots into the directory `out`."""

    @abstractmethod
    def summary(self, metrics: dict) -> str:
        """The headline test figures of metrics.json, for a log line."""

    # -- serve and promote -----------------------------------------------------------------
    @abstractmethod
    def serving_model(self, cfg: Any, net: nn.Module, meta: PreparedMeta) -> nn.Module:
        """The network with its preprocessing baked in: raw inputs in (see models.serving)."""

    @abstractmethod
    def example_input(self, cfg: Any, meta: PreparedMeta) -> np.ndarray | dict[str, np.ndarray]:
        """Two valid raw inputs, for the logged signature and input example: an array, or a dict
        of named arrays for a model of several inputs (the served model takes them positionally,
        in that order)."""

    @abstractmethod
    def input_description(self, cfg: Any, meta: PreparedMeta) -> str:
        """What the served model takes; a champion must take the same to be compared."""

    @abstractmethod
    def serving_spec(self, cfg: Any, meta: PreparedMeta) -> dict:
        """What the registered model needs besides its network to read named inputs and name its
        outputs (serving.json, JSON): feature columns, image size, class names, the series' grid."""

    @abstractmethod
    def serving_signature(self, spec: dict) -> tuple:
        """(input Schema, output Schema) of the registered model, in named columns."""

    @abstractmethod
    def serving_example(self, spec: dict, cfg: Any, meta: PreparedMeta) -> pd.DataFrame:
        """A valid input frame: the logged input example (MLflow predicts on it when logging)."""

    @abstractmethod
    def frame_inputs(self, spec: dict, frame: pd.DataFrame) -> tuple:
        """The served network's raw positional inputs (arrays) from a frame of named inputs; a
        RatchetError naming the column and row for a value it cannot take."""

    @abstractmethod
    def frame_outputs(self, spec: dict, outputs: Any, frame: pd.DataFrame) -> pd.DataFrame:
        """Named predictions (class names, probabilities; forecast timestamps) from the network's
        outputs for `frame`."""

    @abstractmethod
    def read_input(self, spec: dict, path: Path) -> tuple[pd.DataFrame, list[str]]:
        """`ratchet predict`'s INPUT (a CSV, an image file or folder) as the frame the registered
        model takes, indexed by what names each row (file line, image path), and notes for the
        log (e.g. the columns ignored)."""

    @abstractmethod
    def gate_data(self, cfg: Any, prepared: Prepared) -> tuple:
        """(raw test inputs, test targets) that the gate scores every registered model on."""

    @abstractmethod
    def sample_keys(self, cfg: Any, prepared: Prepared, split: str) -> np.ndarray:
        """Content keys (uint64) of a split's samples, one row per sample in `samples` /
        `gate_data` order, one column per key: a test sample whose keys meet the keys of what a
        model trained on (train and val: the fingerprint kept with each registered version)
        is left out of the gate's comparison."""

    @abstractmethod
    def score(self, cfg: Any, model: nn.Module, meta: PreparedMeta, x, y, metric: str) -> float:
        """`metric` of a served (registered) model on raw inputs `x` and targets `y` of the
        prepared data described by `meta`."""
