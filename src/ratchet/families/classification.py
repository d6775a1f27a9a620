"""What the classifying families (tabular, image) share: cross-entropy, torchmetrics accuracy and
precision/recall/F1 (micro, macro, weighted, per class), the classification report, the
confusion matrix, and a gate on any of those test metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ratchet.families.base import Family, PreparedMeta

MONITORS = ("val_loss", "val_accuracy", "val_f1_macro")
GATE_METRICS = ("accuracy", "f1_macro", "f1_micro", "f1_weighted",
                "precision_macro", "precision_weighted", "recall_macro", "recall_weighted")


class ClassificationMeta(PreparedMeta):
    id: str  # what `<split>_ids` holds: CSV row numbers, image paths
    classes: list[str]
    class_counts: dict[str, list[int]]


class ClassifierFamily(Family):
    """Shared hooks of the classifying families; a subclass adds its data, models and serving."""

    monitors = MONITORS
    gate_metrics = GATE_METRICS

    def describe(self, meta: ClassificationMeta) -> str:
        return f"{len(meta.classes)} classes"

    def samples(self, cfg, prepared, split: str) -> tuple:
        return prepared.array(f"{split}_x"), prepared.array(f"{split}_y")

    def objective(self, cfg, meta: ClassificationMeta, device):
        import torch
        from torch import nn

        from ratchet.evaluate.metrics import validation_metrics

        weights = class_weights(cfg, meta)
        weight = None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device)
        return nn.CrossEntropyLoss(weight=weight), validation_metrics(len(meta.classes), device)

    def sample_weights(self, cfg, prepared) -> np.ndarray | None:
        """`train.sampler: balanced`: each training sample drawn with probability 1 / its class's
        count, so every class is drawn equally often."""
        if cfg.train.sampler != "balanced":
            return None
        y = np.asarray(prepared.array("train_y"))
        return 1.0 / np.bincount(y, minlength=len(prepared.meta.classes))[y]

    def on_train_start(self, cfg, prepared) -> None:
        """The loss weight of each class, when `train.class_weights` sets them."""
        import re

        import mlflow

        weights = class_weights(cfg, prepared.meta)
        if weights is not None:
            mlflow.log_params({f"class_weight.{re.sub(r'[^A-Za-z0-9_. /-]', '_', name)}": round(w, 6)
                               for name, w in zip(prepared.meta.classes, weights)})
            print("class weights: " + ", ".join(f"{n} {w:.3g}" for n, w in zip(prepared.meta.classes, weights)))

    def evaluate(self, cfg, prepared, net, dist) -> tuple[dict, list[tuple[int, int]]]:
        import torch

        from ratchet.evaluate.metrics import test_metrics
        from ratchet.evaluate.report import metrics_dict
        from ratchet.train.distributed import all_gather_objects, all_reduce_sum
        from ratchet.train.loader import BatchLoader

        meta = prepared.meta
        _, transform = self.transforms(cfg, meta, dist.device)
        loader = BatchLoader(self.samples(cfg, prepared, "test"), cfg.evaluate.batch_size, dist, train=False,
                             transform=transform)
        metrics = test_metrics(len(meta.classes), dist.device)
        loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
        total = torch.zeros(2, device=dist.device)
        local: list[tuple[int, int]] = []
        with torch.no_grad():
            for idx, (inputs, targets) in loader.iter_with_indices():
                logits = net(inputs).float()
                metrics.update(logits, targets)
                total += torch.stack([loss_fn(logits, targets), torch.tensor(float(len(targets)), device=dist.device)])
                local += zip(idx.tolist(), logits.argmax(dim=1).tolist())
        all_reduce_sum(total)
        values = metrics.compute()  # a collective: every process calls it
        predictions = sorted(p for part in all_gather_objects(local) for p in part)
        return metrics_dict(values, meta.classes, (total[0] / total[1]).item()), predictions

    def write_report(self, name: str, cfg, prepared, metrics: dict, predictions: list[tuple[int, int]],
                     out: Path) -> None:
        from ratchet.evaluate.plots import confusion_matrix_png
        from ratchet.evaluate.report import report_text

        meta = prepared.meta
        classes = meta.classes
        (out / "classification_report.txt").write_text(report_text(metrics))
        (out / "classification_report.json").write_text(json.dumps(metrics["per_class"], indent=2) + "\n")
        ids, y = prepared.array("test_ids"), prepared.array("test_y")
        with open(out / "predictions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([meta.id, "actual", "predicted"])
            writer.writerows((ids[i].item(), classes[int(y[i])], classes[p]) for i, p in predictions)
        confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
        for i, p in predictions:
            confusion[int(y[i]), p] += 1
        confusion_matrix_png(confusion.tolist(), classes, out / "confusion_matrix.png", f"{name}: test confusion matrix")

    def summary(self, metrics: dict) -> str:
        return (f"accuracy {metrics['accuracy']:.4f}, f1_macro {metrics['f1_macro']:.4f} "
                f"on {metrics['samples']} test samples")

    def frame_outputs(self, spec: dict, outputs, frame):
        """`label`, `probability` and `prob_<class>` by class name."""
        import pandas as pd

        from ratchet.serve.frames import class_columns

        return pd.DataFrame(class_columns(outputs, spec["classes"]), index=frame.index)

    def gate_data(self, cfg, prepared) -> tuple:
        return prepared.array(prepared.meta.serving_input), prepared.array("test_y")

    def sample_keys(self, cfg, prepared, split: str) -> np.ndarray:
        """One key per sample: the content of its CSV row's features, or of its image file."""
        return np.asarray(prepared.array(f"{split}_keys"))[:, None]

    def score(self, cfg, model, meta: ClassificationMeta, x, y, metric: str) -> float:
        import torch

        from ratchet.evaluate.metrics import test_metrics
        from ratchet.train.batch import chunks

        metrics = test_metrics(len(meta.classes), torch.device("cpu"))
        for inputs, target in chunks(x, y):
            metrics.update(model(inputs), target)
        return float(metrics.compute()[metric])



def class_weights(cfg, meta: ClassificationMeta) -> list[float] | None:
    """`train.class_weights: balanced`: n / (classes x count) per class, from the training split
    (a class seen in every split, so no count is 0); None for `none`."""
    if cfg.train.class_weights == "none":
        return None
    counts = np.array(meta.class_counts["train"], dtype=np.float64)
    return (counts.sum() / (len(counts) * counts)).tolist()
