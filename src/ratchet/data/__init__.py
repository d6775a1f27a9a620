"""Per-family data preparation; every family writes the same prepared-data contract."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ratchet.data import image, sequence, tabular
from ratchet.data.prepared import Prepared

# family -> prepare(pipeline config) -> meta dict
PREPARERS: dict[str, Callable[..., dict]] = {"tabular": tabular.prepare, "image": image.prepare,
                                              "sequence": sequence.prepare}


def samples(prepared: Prepared, split: str, raw: bool = False) -> tuple:
    """(inputs, targets) of a split, indexed by sample, as the loader and the stages take them:
    arrays for tabular and image data; for a series, its windows (views, see data.windows),
    scaled, or in original units with `raw` (`window.stride` apart in training, every window in
    validation and test)."""
    from ratchet.data.sequence import split_stride
    from ratchet.data.windows import windows  # torch: not needed by the prepare stage

    meta = prepared.meta
    if meta["family"] != "sequence":
        return prepared.split(split)
    series = np.array(prepared.array(f"{split}_raw" if raw else f"{split}_series"))
    w = meta["window"]
    return windows(series, series[:, meta["target_index"]].copy(), w["input"], w["horizon"],
                   split_stride(split, w["stride"]))
