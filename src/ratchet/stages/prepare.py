"""Prepare a pipeline's data: `ratchet prepare tabular`.

Reads `<pipeline>.data`, validates it, splits it by `<pipeline>.seed`, fits preprocessing on
the training split only and writes `<pipeline>.prepare.out_dir` (arrays + meta.json).
"""

from __future__ import annotations

from ratchet.config import Params
from ratchet.data import PREPARERS


def run(params: Params, name: str) -> dict:
    cfg = params.pipeline(name)
    meta = PREPARERS[cfg.family](cfg)
    rows = ", ".join(f"{split} {n}" for split, n in meta["rows"].items())
    if "classes" in meta:
        what = f"{len(meta['classes'])} classes"
    else:
        what = (f"{', '.join(f'{s} {n}' for s, n in meta['windows'].items())} windows of "
                f"{meta['window']['input']} -> {meta['window']['horizon']} steps every {meta['frequency']}")
    print(f"prepared {name}: {rows} rows, {what} -> {cfg.prepare.out_dir}")
    return meta
