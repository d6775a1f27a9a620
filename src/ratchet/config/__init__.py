"""Typed, validated view of params.yaml; `load_params()` is the only reader of the raw YAML.

params.yaml holds the `demo`, `schedule` and `numerics` sections and `pipelines`, a mapping of pipeline name -> section;
each section's `family` picks its schema from the family registry (ratchet.families), and the
family says which monitors and gate metrics exist. Every path is written once, relative to the
directory of params.yaml, and resolved to an absolute path here. A bad value fails with one
line naming the file and the dotted key, e.g.
`params.yaml: pipelines.tabular.train.optimizer.lr: must be greater than 0 (got -1)`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ratchet.config.base import (  # noqa: F401  (re-exported: the sections every family shares)
    ClassifierTrainConfig, CsvData, DemoConfig, EarlyStoppingConfig, NumericsConfig, EvaluateConfig, OptimizerConfig, PromoteConfig, ScheduleConfig, SchedulerConfig,
    Section, TrainConfig, check_metric_names, monitor_mode,
)
from ratchet.config.image import AugmentConfig, ImageData, ImagePipeline, ImagePrepare  # noqa: F401
from ratchet.config.models import CNNConfig, LeNetConfig, MLPConfig, RNNConfig  # noqa: F401
from ratchet.config.sequence import SequenceData, SequencePipeline, SequencePrepare, WindowConfig  # noqa: F401
from ratchet.config.tabular import TabularData, TabularPipeline, TabularPrepare  # noqa: F401
from ratchet.errors import RatchetError

PipelineConfig = Section  # a family's pipeline schema (families/<name>.py names it)
TOP_LEVEL = ("demo", "schedule", "numerics", "pipelines")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class Params(BaseModel):
    """The whole of params.yaml, validated."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    file: Path
    demo: DemoConfig
    schedule: ScheduleConfig
    numerics: NumericsConfig
    pipelines: dict[str, PipelineConfig]

    @property
    def root(self) -> Path:
        return self.file.parent

    def pipeline(self, name: str) -> PipelineConfig:
        if name not in self.pipelines:
            known = ", ".join(self.pipelines) or "none"
            raise RatchetError(f"{self.file.name}: no pipeline '{name}' under 'pipelines:' (pipelines: {known})")
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

    from ratchet.families import FAMILIES, get_family  # the registry imports the family schemas

    context = {"root": file.parent}
    unknown = [key for key in raw if key not in TOP_LEVEL]
    if unknown:
        raise RatchetError(f"{file.name}: {unknown[0]}: unknown top-level key (expected {', '.join(TOP_LEVEL)}; "
                           "a pipeline is a section under 'pipelines:')")
    demo = _validate(DemoConfig, raw.get("demo", {}), "demo", file, context)
    schedule = _validate(ScheduleConfig, raw.get("schedule", {}), "schedule", file, context)
    numerics = _validate(NumericsConfig, raw.get("numerics", {}), "numerics", file, context)
    sections = raw.get("pipelines") or {}
    if not isinstance(sections, dict):
        raise RatchetError(f"{file.name}: pipelines: expected a mapping of pipeline name -> section")
    pipelines = {}
    for name, section in sections.items():
        where = f"pipelines.{name}"
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise RatchetError(f"{file.name}: {where}: a pipeline name is letters, digits, _ and - "
                               "(it names DVC stages and MLflow experiments)")
        family = section.get("family") if isinstance(section, dict) else None
        if family not in FAMILIES:
            what = f"unknown family '{family}'" if family else "not a pipeline (it has no 'family' key)"
            raise RatchetError(f"{file.name}: {where}: {what}; families: {', '.join(FAMILIES)}")
        fam = get_family(family)
        cfg = _validate(fam.schema, section, where, file, context)
        try:
            check_metric_names(cfg.train, cfg.promote, fam.monitors, fam.gate_metrics)
        except ValueError as exc:
            raise RatchetError(f"{file.name}: {where}.{exc}") from None
        check_outputs(cfg, file, where)
        check_processes(cfg, file, where)
        pipelines[name] = cfg
    for name in schedule.pipelines:
        if name not in pipelines:
            raise RatchetError(f"{file.name}: schedule.pipelines: no pipeline '{name}' under 'pipelines:' "
                               f"(pipelines: {', '.join(pipelines) or 'none'})")
    return Params(file=file, demo=demo, schedule=schedule, numerics=numerics, pipelines=pipelines)


OUTPUTS = ("prepare.out_dir", "train.out_dir", "train.checkpoint", "evaluate.out_dir", "evaluate.metrics",
           "evaluate.plots", "promote.out")
PROTECTED = ("params.yaml", "dvc.yaml", "dvc.lock", ".git", ".dvc", "src", "pipelines", "tests")


def check_outputs(cfg: BaseModel, file: Path, where: str) -> None:
    """Refuse an output path that a stage's rewrite would destroy something with: outside the
    project, the project itself or a folder holding it, the project's own files (params.yaml,
    dvc.yaml, .git, src, ...), or one that equals, holds or lies inside the pipeline's input
    (`data.source`). A stage replaces its output directory on every run: these are checked
    before anything is touched."""
    root = file.parent
    source = Path(cfg.data.source)
    for key in OUTPUTS:
        section, field = key.split(".")
        path = Path(getattr(getattr(cfg, section), field))
        prefix = f"{file.name}: {where}.{key}: {path}"
        if not path.is_relative_to(root):
            raise RatchetError(f"{prefix} is outside the project ({root}); outputs are written inside it")
        if path == root:
            raise RatchetError(f"{prefix} is the project folder; a stage replaces its output on every run")
        for name in PROTECTED:
            own = root / name
            if own == path or own.is_relative_to(path) or path.is_relative_to(own):
                what = "holds" if own.is_relative_to(path) and own != path else "is" if own == path else "is inside"
                raise RatchetError(f"{prefix} {what} the project's {name}; a stage replaces its output on every run")
        if source == path or source.is_relative_to(path) or path.is_relative_to(source):
            what = "is" if source == path else "holds" if source.is_relative_to(path) else "is inside"
            raise RatchetError(f"{prefix} {what} the input {source} (data.source); an output is replaced on every "
                               "run, so it must not touch the data it is made from")


def check_processes(cfg: BaseModel, file: Path, where: str) -> None:
    """More CPU processes than this machine has cores only time-slices them (and 64 gloo workers
    on 2 cores exhaust memory): refused at load, with the count. GPU counts are checked when the
    stage starts (it needs torch)."""
    import os

    gpus = Path("/dev/nvidiactl").exists() or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and gpus):
        return
    cores = os.cpu_count() or 1
    for key, value in (("train.nproc", cfg.train.nproc), ("evaluate.nproc", cfg.evaluate.nproc)):
        if value > cores:
            raise RatchetError(f"{file.name}: {where}.{key}: {value} processes on the CPU, which has {cores} cores "
                               "here (at most one process per core)")


def _validate(model: type[BaseModel], raw: object, prefix: str, file: Path, context: dict) -> BaseModel:
    try:
        return model.model_validate(raw, context=context)
    except ValidationError as exc:
        raise RatchetError(f"{file.name}: {_describe(exc, prefix, raw)}") from None


def _describe(exc: ValidationError, prefix: str, raw: object) -> str:
    """The first error as `dotted.key: message (got value)`, with a count of any others."""
    err = exc.errors()[0]
    key = ".".join([prefix, *(str(p) for p in _written_path(err["loc"], raw))])
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


def _written_path(loc: tuple, raw: object) -> list:
    """`loc` as written in the YAML: without the tag pydantic inserts for a section chosen by its
    `name` (a model section's error is `model.channels`, not `model.cnn.channels`)."""
    path, node = [], raw
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("name") == part:
            continue
        path.append(part)
        node = node.get(part) if isinstance(node, dict) else node[part] if (
            isinstance(node, list) and isinstance(part, int) and part < len(node)) else None
    return path


def config_hash(*sections: BaseModel | dict | str | int) -> str:
    """A short, stable hash of config sections (and other values), for matching checkpoints."""
    payload = [s.model_dump(mode="json") if isinstance(s, BaseModel) else s for s in sections]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
