"""Prepare a pipeline's data: `ratchet prepare tabular`.

Reads `pipelines.<name>.data`, validates it, splits it by the pipeline's seed, fits
preprocessing on the training split only and writes `prepare.out_dir` (arrays + meta.json):
all of it the family's `prepare` (ratchet/families/<family>.py).
"""

from __future__ import annotations

from ratchet.config import Params
from ratchet.families import get_family


def run(params: Params, name: str):
    cfg = params.pipeline(name)
    family = get_family(cfg.family)
    meta = family.prepare(cfg, params.root)
    rows = ", ".join(f"{split} {n}" for split, n in meta.rows.items())
    print(f"prepared {name}: {rows} rows, {family.describe(meta)} -> {cfg.prepare.out_dir}")
    return meta
