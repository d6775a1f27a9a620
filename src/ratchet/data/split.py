"""Stratified splits fixed by a seed, shared by the classification families."""

from __future__ import annotations

import numpy as np

from ratchet.errors import RatchetError


def stratified_split(y: np.ndarray, classes: list[str], held_out: dict[str, float], seed: int,
                     source: object) -> dict[str, np.ndarray]:
    """Indices per split with the class proportions of `y`: `held_out` maps split names to
    fractions (taken in that order), the rest is "train". Every class appears in every split."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], **{name: [] for name in held_out}}
    for c, name in enumerate(classes):
        idx = np.flatnonzero(y == c)
        needed = len(held_out) + 1
        if len(idx) < needed:
            raise RatchetError(f"{source}: class '{name}' has {len(idx)} sample(s); "
                               f"a split into {', '.join(parts)} needs at least {needed}")
        rng.shuffle(idx)
        start = 0
        for split, fraction in held_out.items():
            count = max(1, round(len(idx) * fraction))
            parts[split].append(idx[start : start + count])
            start += count
        if start >= len(idx):
            raise RatchetError(f"{source}: class '{name}' has too few samples ({len(idx)}) for the requested split")
        parts["train"].append(idx[start:])
    return {split: np.sort(np.concatenate(chunks)) for split, chunks in parts.items()}
