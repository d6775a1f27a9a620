"""Evaluate the trained model on the test split: `ratchet evaluate tabular`.

Shards the test split over `evaluate.nproc` processes without padding, so under DDP each test
sample is counted exactly once and the metrics equal a single-process run. Writes
`evaluate.metrics` (metrics.json, for `dvc metrics`) and `evaluate.out_dir`:
classification_report.txt/.json, confusion_matrix.png, predictions.csv (for DVC's confusion
template) and, for images, misclassified.png (a grid of wrongly classified test images); for
forecasts, forecast_report.txt (MSE, MAE, RMSE in original units beside the naive baselines),
predictions.csv (every test window's next-step forecast), forecast.csv and forecast.png
(forecast vs actual over the first `evaluate.plot_steps` test steps). Logs the same into the
training's MLflow run.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
import torch

from ratchet.config import Params, PipelineConfig
from ratchet.data.prepared import Prepared, load_prepared, replace_dir
from ratchet.data.sequence import split_stride
from ratchet.errors import RatchetError
from ratchet.data import samples
from ratchet.data.transforms import batch_transforms
from ratchet.evaluate import forecast, summary_line
from ratchet.evaluate.metrics import task, test_metrics
from ratchet.evaluate.plots import confusion_matrix_png, forecast_png, image_grid_png
from ratchet.evaluate.report import metrics_dict, report_text
from ratchet.models import build_model
from ratchet.stages.train import MODEL_FILE
from ratchet.tracking.runs import numeric, tracked_run, training_run, use_tracking
from ratchet.train.distributed import DistInfo, all_gather_objects, all_reduce_sum, distributed, launch, under_torchrun
from ratchet.train.loader import BatchLoader

def run(params: Params, name: str) -> dict:
    """Evaluate pipeline `name` on its test split; return metrics.json's content."""
    cfg = params.pipeline(name)
    prepared = load_prepared(cfg.prepare.out_dir)
    run_info = tracked_run(cfg.train.out_dir, params.root, name)
    if cfg.evaluate.nproc > 1 and not under_torchrun():
        launch(cfg.evaluate.nproc, "evaluate", name, str(params.file))
        return json.loads(cfg.evaluate.metrics.read_text())
    forecasting = task(prepared.meta) == "forecast"
    with distributed(cfg.train.device) as dist:
        metrics, predictions = (_evaluate_forecast if forecasting else _evaluate)(cfg, prepared, dist)
        if dist.is_main:
            write = _forecast_files if forecasting else _classification_files
            _write_outputs(params, name, cfg, metrics, run_info["run_id"],
                           lambda tmp: write(name, cfg, prepared, metrics, predictions, tmp))
            print(f"evaluated {name}: {summary_line(metrics)} -> {cfg.evaluate.out_dir}")
    return metrics


def load_trained(cfg: PipelineConfig, meta: dict, device: torch.device) -> torch.nn.Module:
    """The trained network, rebuilt from the model config saved with it (not today's params)."""
    path = cfg.train.out_dir / MODEL_FILE
    if not path.is_file():
        raise RatchetError(f"{path}: not found; run the train stage first")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    net = build_model(type(cfg.model).model_validate(saved["config"]["model"]), meta)
    net.load_state_dict(saved["model"])
    return net.to(device).eval()


@torch.no_grad()
def _evaluate(cfg: PipelineConfig, prepared: Prepared, dist: DistInfo) -> tuple[dict, list[tuple[int, int]]]:
    meta = prepared.meta
    net = load_trained(cfg, meta, dist.device)
    _, transform = batch_transforms(cfg, meta, dist.device)
    loader = BatchLoader(samples(prepared, "test"), cfg.evaluate.batch_size, dist, train=False, transform=transform)
    metrics = test_metrics(len(meta["classes"]), dist.device)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    total = torch.zeros(2, device=dist.device)
    local: list[tuple[int, int]] = []
    for idx, (inputs, targets) in loader.iter_with_indices():
        logits = net(inputs).float()
        metrics.update(logits, targets)
        total += torch.stack([loss_fn(logits, targets), torch.tensor(float(len(targets)), device=dist.device)])
        local += zip(idx.tolist(), logits.argmax(dim=1).tolist())
    all_reduce_sum(total)
    values = metrics.compute()  # a collective: every process calls it
    predictions = sorted(p for part in all_gather_objects(local) for p in part)
    return metrics_dict(values, meta["classes"], (total[0] / total[1]).item()), predictions


@torch.no_grad()
def _evaluate_forecast(cfg: PipelineConfig, prepared: Prepared, dist: DistInfo) -> tuple[dict, list[tuple]]:
    meta = prepared.meta
    net = load_trained(cfg, meta, dist.device)
    inputs, _ = samples(prepared, "test")
    raw_inputs, actual = samples(prepared, "test", raw=True)
    loader = BatchLoader([inputs, raw_inputs, actual], cfg.evaluate.batch_size, dist, train=False)
    t = meta["target_index"]
    errors = forecast.ForecastErrors(meta["window"]["horizon"], t, meta["offset"][t], meta["scale"][t],
                                     cfg.evaluate.seasonal_period, dist.device)
    local: list[tuple] = []
    for idx, (x, x_raw, y) in loader.iter_with_indices():
        predicted = errors.forecasts(net(x).float(), x_raw)
        errors.update(predicted, y)
        firsts = [predicted[name][:, 0].tolist() for name in errors.names]
        local += zip(idx.tolist(), *firsts)
    errors.sums = all_reduce_sum(errors.sums)
    errors.count = all_reduce_sum(errors.count)
    predictions = sorted(p for part in all_gather_objects(local) for p in part)
    return errors.compute(), predictions


def _write_outputs(params: Params, name: str, cfg: PipelineConfig, metrics: dict, run_id: str, write_files) -> None:
    """metrics.json, the family's files (`write_files(tmp)`), MLflow; then swap them into place."""
    out_dir = cfg.evaluate.out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
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
        cfg.evaluate.metrics.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / "metrics.json", cfg.evaluate.metrics)  # complete before it appears
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _classification_files(name: str, cfg: PipelineConfig, prepared: Prepared, metrics: dict,
                          predictions: list[tuple[int, int]], tmp: Path) -> None:
    meta = prepared.meta
    classes = meta["classes"]
    (tmp / "classification_report.txt").write_text(report_text(metrics))
    (tmp / "classification_report.json").write_text(json.dumps(metrics["per_class"], indent=2) + "\n")
    ids = prepared.array("test_ids")
    with open(tmp / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([meta["id"], "actual", "predicted"])
        y = prepared.array("test_y")
        writer.writerows((ids[i].item(), classes[int(y[i])], classes[p]) for i, p in predictions)
    confusion = _confusion(predictions, prepared.array("test_y"), len(classes))
    confusion_matrix_png(confusion, classes, tmp / "confusion_matrix.png", f"{name}: test confusion matrix")
    if meta["family"] == "image":
        _misclassified_png(name, prepared, predictions, classes, tmp / "misclassified.png")


def _forecast_files(name: str, cfg: PipelineConfig, prepared: Prepared, metrics: dict,
                    predictions: list[tuple], tmp: Path) -> None:
    """The report, and every window's next-step forecast beside the actual value and baselines."""
    meta = prepared.meta
    (tmp / "forecast_report.txt").write_text(forecast.report_text(metrics, meta["target"]))
    times = prepared.array("test_time")
    raw = prepared.array("test_raw")
    w, t = meta["window"], meta["target_index"]
    names = ["predicted", "naive"] + (["seasonal_naive"] if cfg.evaluate.seasonal_period else [])
    header = [meta["timestamp"], "actual", *names]
    rows = []
    for i, *values in predictions:
        step = i * split_stride("test", w["stride"]) + w["input"]  # the first forecast step of window i
        rows.append([str(pd.Timestamp(int(times[step]))), *(float(f"{v:.6g}") for v in (raw[step, t], *values))])
    for path, part in (("predictions.csv", rows), ("forecast.csv", rows[: cfg.evaluate.plot_steps])):
        with open(tmp / path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(part)
    forecast_png(header, rows[: cfg.evaluate.plot_steps], tmp / "forecast.png",
                 f"{name}: next-step forecast of {meta['target']} vs actual (test)")


def _misclassified_png(name: str, prepared: Prepared, predictions: list[tuple[int, int]], classes: list[str],
                       path: Path, limit: int = 30) -> None:
    y = prepared.array("test_y")
    wrong = [(i, p) for i, p in predictions if p != int(y[i])]
    shown = wrong[:limit]
    images = prepared.array("test_x")[[i for i, _ in shown]] if shown else []
    captions = [f"{classes[int(y[i])]}\n-> {classes[p]}" for i, p in shown]
    more = f", first {len(shown)} shown" if len(wrong) > len(shown) else ""
    image_grid_png(images, captions, path, f"{name}: {len(wrong)} misclassified test images (actual -> predicted){more}")


def _confusion(predictions: list[tuple[int, int]], y, num_classes: int) -> list[list[int]]:
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for i, p in predictions:
        matrix[int(y[i])][p] += 1
    return matrix


def _metric_safe(name: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and space."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)
