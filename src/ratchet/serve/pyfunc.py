"""MLflow's loader for registered Ratchet models (`loader_module: ratchet.serve.pyfunc`).

    model = mlflow.pyfunc.load_model("models:/tabular@champion")
    model.predict(frame)   # -> DataFrame: label, probability, prob_<class>, ...

MLflow checks the input against the signature (names; float64 columns; extra columns are
ignored), then the family turns the named inputs into the network's raw inputs and its outputs
into named columns. A bad value is an MLflow INVALID_PARAMETER_VALUE error (HTTP 400 when
served) that names the column and row.
"""

from __future__ import annotations

import json
from pathlib import Path

SPEC_FILE = "serving.json"
PROGRAM_FILE = "model.pt2"
CHUNK = 4096  # rows per forward pass: bounded memory for large requests


class ServedModel:
    """The pyfunc implementation: named inputs in, named predictions out."""

    def __init__(self, data_dir: Path):
        from ratchet.families import get_family
        from ratchet.serve.pt2 import load_pt2

        self.spec = json.loads((Path(data_dir) / SPEC_FILE).read_text())
        self.family = get_family(self.spec["family"])
        self.module = load_pt2(Path(data_dir) / PROGRAM_FILE, f"model of pipeline '{self.spec['pipeline']}'")

    def get_raw_model(self) -> ServedModel:
        """`PyFuncModel.get_raw_model()`: this object, whose predict skips MLflow's schema step
        (ratchet predict hands it frames already read by the family, errors by line)."""
        return self

    def predict(self, model_input, params=None):
        import numpy as np
        import pandas as pd
        import torch
        from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

        from ratchet.errors import RatchetError

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        try:
            inputs = self.family.frame_inputs(self.spec, frame)
        except RatchetError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        outputs = []
        with torch.no_grad():
            for start in range(0, len(inputs[0]), CHUNK):
                out = self.module(*(torch.from_numpy(np.array(a[start:start + CHUNK])) for a in inputs))  # a copy:
                # a frame's arrays may be read-only views
                outputs.append({k: v.numpy() for k, v in out.items()} if isinstance(out, dict) else out.numpy())
        return self.family.frame_outputs(self.spec, _concat(outputs), frame)


def _concat(parts: list):
    import numpy as np

    if isinstance(parts[0], dict):
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    return np.concatenate(parts)


def _load_pyfunc(data_path: str, model_config=None) -> ServedModel:
    return ServedModel(Path(data_path))
