"""Thin entry points that dvc.yaml and the Prefect flow call: `ratchet <step> <pipeline>`.

dvc.yaml defines each step once over every pipeline in params.yaml (`foreach`), so DVC names a
pipeline's stage `<step>@<pipeline>`; `stage_name` is the one place that spells it.
"""

STEPS = ("prepare", "train", "evaluate", "promote")
# What the train stage writes in train.out_dir, beside run.json (named here, so a stage that
# reads them does not import the training code).
MODEL_FILE = "model.pt"
HISTORY_FILE = "history.csv"


def stage_name(step: str, pipeline: str) -> str:
    """The DVC stage of `step` for `pipeline`, e.g. `train@tabular`."""
    return f"{step}@{pipeline}"
