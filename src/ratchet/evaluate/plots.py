"""PNG plots for MLflow: confusion matrix with class names, per-epoch curves, image grids, forecasts."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def confusion_matrix_png(matrix: list[list[int]], classes: list[str], path: Path, title: str = "") -> None:
    n = len(classes)
    size = max(4.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    peak = max(max(row) for row in matrix) or 1
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center",
                    color="white" if matrix[i][j] > peak / 2 else "black")
    ax.set_title(title or "confusion matrix (test)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curves_png(history: list[dict], path: Path) -> None:
    """Train/val loss and validation metrics per epoch, side by side."""
    epochs = [r["epoch"] for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "val_loss"):
        left.plot(epochs, [r[key] for r in history], marker="o", label=key)
    left.set_xlabel("epoch")
    left.set_title("loss")
    left.legend()
    for key in sorted(k for k in history[0] if k.startswith("val_") and k != "val_loss"):
        right.plot(epochs, [r[key] for r in history], marker="o", label=key)
    right.set_xlabel("epoch")
    right.set_title("validation metrics")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def image_grid_png(images, captions: list[str], path: Path, title: str, columns: int = 6) -> None:
    """uint8 images (N, C, H, W) in a grid, each with its caption (e.g. actual -> predicted)."""
    n = len(images)
    if n == 0:
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    else:
        cols = min(columns, n)
        rows = -(-n // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows + 0.4), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, image, caption in zip(axes.flat, images, captions):
            if image.shape[0] == 1:
                ax.imshow(image[0], cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(image.transpose(1, 2, 0))
            ax.set_title(caption, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def forecast_png(header: list[str], rows: list[list], path: Path, title: str) -> None:
    """Actual values and forecasts over time: `rows` are [timestamp, actual, forecast...]."""
    import pandas as pd

    times = pd.to_datetime([r[0] for r in rows])
    fig, ax = plt.subplots(figsize=(12, 4))
    for j, label in enumerate(header[1:], start=1):
        ax.plot(times, [r[j] for r in rows], label=label, linewidth=1.6 if j <= 2 else 0.9,
                linestyle="-" if j <= 2 else "--", color="black" if j == 1 else None)
    ax.set_xlabel(header[0])
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
