"""Thin entry points that dvc.yaml and the Prefect flow call: `ratchet <step> <pipeline>`.

dvc.yaml defines each step once over every pipeline in params.yaml (`foreach`), so DVC names a
pipeline's stage `<step>@<pipeline>`; `stage_name` is the one place that spells it.
"""

STEPS = ("prepare", "train", "evaluate", "promote")
# Steps whose own process runs no torch kernel, so `ratchet` neither pins the numerics for them
# nor imports torch first (~1.2 s on 2 cores): promote reads the registry in its own process and
# scores in a worker process that pins them itself (ratchet.tracking.scorer).
UNPINNED = ("promote",)
# What the train stage writes in train.out_dir, beside run.json (named here, so a stage that
# reads them does not import the training code).
MODEL_FILE = "model.pt"
HISTORY_FILE = "history.csv"


def stage_name(step: str, pipeline: str) -> str:
    """The DVC stage of `step` for `pipeline`, e.g. `train@tabular`."""
    return f"{step}@{pipeline}"
