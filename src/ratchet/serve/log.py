"""Log the served network as the registered model: a pyfunc over `model.pt2` and `serving.json`."""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path

from ratchet.serve.pyfunc import PROGRAM_FILE, SPEC_FILE

LOADER = "ratchet.serve.pyfunc"
DATA_DIR = "served"  # the data folder inside the logged model: data/served/{model.pt2, serving.json}


def export(served, example) -> object:
    """torch.export of the served network, traced on `example` (an array, or a dict of named
    arrays passed positionally in that order) with a dynamic batch dimension."""
    import torch
    from torch.export import Dim

    positional = tuple(torch.from_numpy(a) for a in (example.values() if isinstance(example, dict) else [example]))
    dynamic = tuple({0: Dim.AUTO} for _ in positional)  # every input: any batch size
    with warnings.catch_warnings():  # torch.export's note on RNN weight attributes: harmless here
        warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
        return torch.export.export(served, positional, dynamic_shapes=dynamic)


def log_served_model(family, cfg, meta, served, example, pipeline: str):
    """Log `served` (the network with its preprocessing) under the active run as `model`; return
    MLflow's ModelInfo. The signature, input example and output schema come from the family."""
    import mlflow
    import torch
    from mlflow.models import ModelSignature

    spec = {"family": family.name, "pipeline": pipeline, "input": family.input_description(cfg, meta),
            **family.serving_spec(cfg, meta)}
    inputs, outputs = family.serving_signature(spec)
    with tempfile.TemporaryDirectory(prefix="ratchet-served-") as tmp:
        data = Path(tmp) / DATA_DIR
        data.mkdir()
        torch.export.save(export(served, example), str(data / PROGRAM_FILE))
        (data / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        return mlflow.models.Model.log(
            artifact_path=None, name="model", flavor=sys.modules[__name__], data_path=str(data),
            signature=ModelSignature(inputs=inputs, outputs=outputs),
            input_example=family.serving_example(spec, cfg, meta),
            # The loader is the installed ratchet package (`pip install -e .` in this project);
            # serve with `--env-manager local` from its environment.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                              "pandas", "pillow", "ratchet"],
            metadata={"ratchet": spec},
        )


def save_model(path: str, mlflow_model, data_path: str, **kwargs) -> None:
    """The flavor's save (MLflow's `Model.log` calls it): a pyfunc model read by `LOADER`, plus
    MLflow's pytorch flavor over the same pt2 archive, so `mlflow.pytorch.load_model` returns the
    exported network too (weights as tensors, nothing unpickled)."""
    import mlflow
    import torch

    mlflow.pyfunc.save_model(path, loader_module=LOADER, data_path=data_path, mlflow_model=mlflow_model, **kwargs)
    mlflow_model.add_flavor("pytorch", model_data=f"data/{DATA_DIR}", pytorch_version=str(torch.__version__))
    mlflow_model.save(str(Path(path) / "MLmodel"))
