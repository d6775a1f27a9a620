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


def flatten_metrics(values: dict, prefix: str) -> dict[str, float]:
    """{'acc': t} -> {'val_acc': float}; per-head results {'class': {'acc': t}} -> {'val_class_acc': ...}."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten_metrics(value, f"{prefix}{key}_"))
        else:
            out[f"{prefix}{key}"] = float(value)
    return out
