"""Structured batches: `(inputs, targets)` where each may be one tensor or a tuple/list/dict of
tensors (several inputs, several heads). Casting, device moves and gathers apply to every leaf."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    """`fn` applied to every leaf of nested tuples, lists and dicts (their shape kept)."""
    if isinstance(tree, dict):
        return {key: tree_map(fn, value) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(fn, value) for value in tree)
    return fn(tree)


def leaves(tree: Any) -> list:
    """The leaves in order (dicts in their key order)."""
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in leaves(value)]
    if isinstance(tree, (tuple, list)):
        return [leaf for value in tree for leaf in leaves(value)]
    return [tree]


def batch_size(targets: Any) -> int:
    """Samples in a batch: the length of its first target."""
    return len(leaves(targets)[0])


def split_loss(value: Any) -> tuple[Any, dict]:
    """A loss function's result as (total, {part: tensor}): a tensor alone has no parts; a
    `(total, parts)` pair is a weighted sum of per-head losses, each logged on its own."""
    if isinstance(value, tuple):
        total, parts = value
        return total, dict(parts)
    return value, {}


def chunks(x: Any, y: Any, budget: int = 64 << 20):
    """(inputs, targets) as tensors, about `budget` bytes of inputs at a time, without gradients:
    the promotion gate's pass over a whole test split. `x` and `y` are arrays, memory-mapped
    arrays or windows, or dicts of them (several inputs or heads); each chunk is a writable copy."""
    import numpy as np
    import torch

    first = leaves(x)[0]
    step = max(1, budget // max(1, sum(leaf[:1].nbytes for leaf in leaves(x))))
    take = lambda start: lambda a: torch.as_tensor(np.array(a[start : start + step]))  # noqa: E731
    with torch.no_grad():
        for start in range(0, len(first), step):
            yield tree_map(take(start), x), tree_map(take(start), y)


def flatten_metrics(values: dict, prefix: str) -> dict[str, float]:
    """{'acc': t} -> {'val_acc': float}; per-head results {'class': {'acc': t}} -> {'val_class_acc': ...}."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten_metrics(value, f"{prefix}{key}_"))
        else:
            out[f"{prefix}{key}"] = float(value)
    return out
