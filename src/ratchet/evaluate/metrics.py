"""torchmetrics collections for classifiers; metric states sync across processes on compute()."""

from __future__ import annotations

import torch
from ratchet.lazy_imports import defer_torchmetrics

defer_torchmetrics()  # before torchmetrics' first import: only the metrics used are loaded
from torchmetrics.classification import ConfusionMatrix, MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall
from torchmetrics.collections import MetricCollection

AVERAGES = ("micro", "macro", "weighted")


def validation_metrics(num_classes: int, device: torch.device) -> MetricCollection:
    """The cheap per-epoch set: accuracy and macro-F1. The trainer feeds them well-formed
    logits and labels, so torchmetrics' per-update input checks are skipped."""
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(num_classes, average="micro", validate_args=False),
            "f1_macro": MulticlassF1Score(num_classes, average="macro", validate_args=False),
        }
    ).to(device)


def test_metrics(num_classes: int, device: torch.device) -> MetricCollection:
    """Accuracy, precision/recall/F1 micro/macro/weighted and per class, confusion matrix."""
    metrics = {"accuracy": MulticlassAccuracy(num_classes, average="micro")}
    for name, cls in (("precision", MulticlassPrecision), ("recall", MulticlassRecall), ("f1", MulticlassF1Score)):
        for average in AVERAGES:
            metrics[f"{name}_{average}"] = cls(num_classes, average=average, zero_division=0)
        metrics[f"{name}_per_class"] = cls(num_classes, average="none", zero_division=0)
    metrics["confusion_matrix"] = ConfusionMatrix(task="multiclass", num_classes=num_classes)
    return MetricCollection(metrics, compute_groups=False).to(device)
