"""Classification report (text like scikit-learn's, and JSON) from computed torchmetrics values."""

from __future__ import annotations

import torch

from ratchet.evaluate.metrics import AVERAGES


def metrics_dict(values: dict[str, torch.Tensor], classes: list[str], loss: float) -> dict:
    """metrics.json's content: overall scalars plus a `per_class` table with support."""
    confusion = values["confusion_matrix"].long()
    support = confusion.sum(dim=1).tolist()
    out: dict = {"loss": loss, "accuracy": float(values["accuracy"])}
    for name in ("precision", "recall", "f1"):
        for average in AVERAGES:
            out[f"{name}_{average}"] = float(values[f"{name}_{average}"])
    out["samples"] = int(confusion.sum())
    out["per_class"] = {
        cls: {
            "precision": float(values["precision_per_class"][i]),
            "recall": float(values["recall_per_class"][i]),
            "f1": float(values["f1_per_class"][i]),
            "support": int(support[i]),
        }
        for i, cls in enumerate(classes)
    }
    return out


def report_text(metrics: dict) -> str:
    """The report as a fixed-width table: per class, accuracy, macro and weighted averages."""
    per_class = metrics["per_class"]
    width = max(12, *(len(c) for c in per_class)) + 2
    lines = [f"{'':>{width}}{'precision':>11}{'recall':>11}{'f1-score':>11}{'support':>11}", ""]
    for cls, row in per_class.items():
        lines.append(f"{cls:>{width}}{row['precision']:>11.4f}{row['recall']:>11.4f}{row['f1']:>11.4f}{row['support']:>11}")
    total = metrics["samples"]
    lines += ["", f"{'accuracy':>{width}}{'':>11}{'':>11}{metrics['accuracy']:>11.4f}{total:>11}"]
    for average in ("macro", "weighted"):
        lines.append(
            f"{average + ' avg':>{width}}{metrics[f'precision_{average}']:>11.4f}{metrics[f'recall_{average}']:>11.4f}"
            f"{metrics[f'f1_{average}']:>11.4f}{total:>11}"
        )
    return "\n".join(lines) + "\n"
