"""Evaluate the trained model on the test split: `ratchet evaluate tabular`.

The family computes the test metrics (`evaluate`: sharded over `evaluate.nproc` processes
without padding, so under DDP each test sample is counted exactly once and the metrics equal a
single-process run) and writes its report and plots (`write_report`): for classifiers
classification_report.txt/.json, confusion_matrix.png, predictions.csv (for DVC's confusion
template) and, for images, misclassified.png; for forecasts forecast_report.txt, predictions.csv,
forecast.csv and forecast.png. This stage writes `evaluate.metrics` (metrics.json, for
`dvc metrics`) and `evaluate.out_dir` atomically and logs the same into the training's MLflow run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import mlflow
import torch

from ratchet.config import Params, PipelineConfig
from ratchet.data.prepared import check_replaceable, replace_dir
from ratchet.errors import RatchetError
from ratchet.families import Family, get_family
from ratchet.stages import HISTORY_FILE, MODEL_FILE, stage_name
from ratchet.tracking.runs import numeric, tracked_run, training_run, use_tracking
from ratchet.train.distributed import distributed, launch, under_torchrun


def run(params: Params, name: str) -> dict:
    """Evaluate pipeline `name` on its test split; return metrics.json's content."""
    cfg = params.pipeline(name)
    family = get_family(cfg.family)
    prepared = family.load(cfg.prepare.out_dir)
    run_info = tracked_run(cfg.train.out_dir, params.root, stage_name("train", name))
    for out in (cfg.evaluate.out_dir, cfg.evaluate.plots):  # before any work: foreign directories stay untouched
        check_replaceable(out)
    if cfg.evaluate.nproc > 1 and not under_torchrun():
        launch(cfg.evaluate.nproc, "evaluate", name, str(params.file))
        return json.loads(cfg.evaluate.metrics.read_text())
    with distributed(cfg.train.device) as dist:
        net = load_trained(cfg, family, prepared.meta, dist.device)
        metrics, predictions = family.evaluate(cfg, prepared, net, dist)
        if dist.is_main:
            _write_outputs(params, name, cfg, metrics, run_info["run_id"],
                           lambda tmp: family.write_report(name, cfg, prepared, metrics, predictions, tmp))
            print(f"evaluated {name}: {family.summary(metrics)} -> {cfg.evaluate.out_dir}")
    return metrics


def load_trained(cfg: PipelineConfig, family: Family, meta, device: torch.device) -> torch.nn.Module:
    """The trained network, rebuilt from the model config saved with it (not today's params)."""
    path = cfg.train.out_dir / MODEL_FILE
    if not path.is_file():
        raise RatchetError(f"{path}: not found; run the train stage first")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model_cfg = type(cfg.model).model_validate(saved["config"]["model"])
    net = family.new_model(model_cfg, meta)
    net.load_state_dict(saved["model"])
    return net.to(device).eval()


def _write_outputs(params: Params, name: str, cfg: PipelineConfig, metrics: dict, run_id: str, write_files) -> None:
    """metrics.json, the family's files (`write_files(tmp)`), MLflow; then swap them into place."""
    out_dir = cfg.evaluate.out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    plots = None
    try:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_files(tmp)
        use_tracking(params.root)
        with training_run(name, params.root, run_id=run_id):
            mlflow.log_metrics(numeric(metrics, "test_"))
            for cls, row in metrics.get("per_class", {}).items():
                mlflow.log_metrics(numeric(row, f"test_class_{_metric_safe(cls)}_"))
            per_step = metrics.get("per_step", [])
            for row in per_step if len(per_step) > 1 else []:  # a horizon of several steps: errors by step
                mlflow.log_metrics(numeric({k: v for k, v in row.items() if k != "step"}, "test_step_"), step=row["step"])
            mlflow.log_artifacts(str(tmp), "evaluation")
        plots = _plots_dir(cfg, tmp)
        cfg.evaluate.metrics.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / "metrics.json", cfg.evaluate.metrics)  # complete before it appears
        replace_dir(plots, cfg.evaluate.plots)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if plots is not None:
            shutil.rmtree(plots, ignore_errors=True)
        raise


def _plots_dir(cfg: PipelineConfig, evaluation: Path) -> Path:
    """A new folder beside `evaluate.plots` for `dvc plots show`: the training's history.csv (x
    epoch, y val_loss) and curves.png, and every PNG the family's report drew. DVC reads a plots
    folder with one set of properties, so only these kinds of file go there."""
    target = cfg.evaluate.plots
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for path in [cfg.train.out_dir / HISTORY_FILE, cfg.train.out_dir / "curves.png", *sorted(evaluation.glob("*.png"))]:
            if path.is_file():
                shutil.copy2(path, folder / path.name)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _metric_safe(name: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and space."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)
