"""Report sections of a model with several heads: accuracy within groups, the most confused pairs."""

from __future__ import annotations

import numpy as np


def group_accuracy(confusion: np.ndarray, groups: list[str], class_group: list[int]) -> str:
    """Class-head accuracy over the test samples of each group, and how often a wrong answer
    still names a class of the right group."""
    of = np.asarray(class_group)
    lines = [f"{'group':>20}{'samples':>10}{'accuracy':>10}{'same group':>12}"]
    for g, group in enumerate(groups):
        rows = confusion[of == g]
        total = int(rows.sum())
        right = int(confusion.diagonal()[of == g].sum())
        in_group = int(rows[:, of == g].sum())
        if total:
            lines.append(f"{group:>20}{total:>10}{right / total:>10.4f}{in_group / total:>12.4f}")
    return "\n".join(lines) + "\n"


def most_confused(confusion: np.ndarray, names: list[str], limit: int) -> str:
    """The `limit` most frequent (actual -> predicted) mistakes."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None)[::-1][:limit]
    lines = [f"{'count':>7}  actual -> predicted (the {limit} most confused pairs)"]
    for flat in order:
        i, j = np.unravel_index(flat, off.shape)
        if off[i, j] == 0:
            break
        lines.append(f"{int(off[i, j]):>7}  {names[i]} -> {names[j]}")
    return "\n".join(lines) + "\n"
