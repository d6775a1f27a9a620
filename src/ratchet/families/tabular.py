"""The tabular family: a CSV with one label column -> an MLP classifier (binary or multiclass).

Prepare (data/tabular.py) imputes and standardises with training-split statistics; the served
model takes raw feature rows (NaN allowed) and applies them itself.
"""

from __future__ import annotations

from pathlib import Path

from ratchet.config.tabular import TabularPipeline
from ratchet.families.classification import ClassificationMeta, ClassifierFamily


class TabularMeta(ClassificationMeta):
    files: dict[str, str]  # the CSV each split's rows come from (<split>_ids: 0-based data rows of it)
    label: str
    features: list[str]
    impute: str
    fill: list[float]
    mean: list[float]
    std: list[float]


class TabularFamily(ClassifierFamily):
    name = "tabular"
    schema = TabularPipeline
    Meta = TabularMeta

    def prepare(self, cfg: TabularPipeline, root: Path) -> TabularMeta:
        from ratchet.data.tabular import prepare

        return TabularMeta.model_validate(prepare(cfg, root))

    def transforms(self, cfg, meta, device):
        return None, None  # prepare wrote standardised arrays

    def memory_format(self, meta):
        import torch

        return torch.contiguous_format

    def build_model(self, model_cfg, meta: TabularMeta):
        from ratchet.models.mlp import MLP

        return MLP(len(meta.features), len(meta.classes), model_cfg)

    def check_init_from(self, saved_model_cfg: dict, cfg, source: str) -> None:
        pass  # matching shapes are the whole compatibility of an MLP

    def serving_model(self, cfg, net, meta: TabularMeta):
        from torch import nn

        from ratchet.models.serving import TabularPreprocess

        return nn.Sequential(TabularPreprocess(meta.fill, meta.mean, meta.std), net).eval()

    def example_input(self, cfg, meta: TabularMeta):
        import numpy as np

        return np.array([meta.mean, meta.fill], dtype=np.float32)

    def input_description(self, cfg, meta: TabularMeta) -> str:
        return "features: " + ", ".join(meta.features) + "; classes: " + ", ".join(meta.classes)

    def serving_spec(self, cfg, meta: TabularMeta) -> dict:
        return {"features": meta.features, "classes": meta.classes, "label": meta.label,
                "delimiter": cfg.data.delimiter, "columns": cfg.data.columns}

    def serving_signature(self, spec: dict) -> tuple:
        from mlflow.types import ColSpec, Schema

        from ratchet.serve.frames import class_schema

        return Schema([ColSpec("double", name) for name in spec["features"]]), Schema(class_schema(spec["classes"]))

    def serving_example(self, spec: dict, cfg, meta: TabularMeta):
        import pandas as pd

        return pd.DataFrame(self.example_input(cfg, meta).astype("float64"), columns=meta.features)

    def frame_inputs(self, spec: dict, frame) -> tuple:
        from ratchet.serve.frames import numbers

        return (numbers(frame, spec["features"], allow_missing=True),)  # NaN: imputed by the model

    def read_input(self, spec: dict, path):
        """A CSV's rows, its columns matched to the features by name (any order); the label and
        any other column are ignored, and listed."""
        import pandas as pd

        from ratchet.data.prepared import read_csv

        frame = read_csv(path, spec["features"], columns=spec.get("columns"), delimiter=spec.get("delimiter", ","))
        frame.index = pd.RangeIndex(frame.attrs["first_line"], frame.attrs["first_line"] + len(frame), name="line")
        ignored = [str(c) for c in frame.columns if c not in spec["features"]]
        notes = [f"ignored columns (not model inputs): {', '.join(ignored)}"] if ignored else []
        return frame[spec["features"]], notes


FAMILY = TabularFamily()
