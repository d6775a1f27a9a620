"""Score new data with a registered model: `ratchet predict tabular new.csv --out predictions.csv`.

    ratchet predict tabular rows.csv --out scored.csv                  # @champion
    ratchet predict image photos/ --out labels.csv --model models:/image/3
    ratchet predict sequence recent.csv --out forecast.csv --model @challenger

INPUT is what the pipeline's family reads (a CSV of rows matched by column name, an image file
or folder, a series CSV); the registered model does the rest (preprocessing, class names). The
output CSV has a row per input row or image (per forecast step for a series) and the column
`model` naming the registered version used. Bad input is one line, exit 2, and no output file.

The model is found in the tracking store of the project in the working directory (params.yaml
there: its mlflow.db and `promote.registered_model`), or, from any folder, in the store that
MLFLOW_TRACKING_URI names (the registered model whose versions that pipeline trained, or the
registered model of that name).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ratchet.errors import RatchetError

LOADER = "ratchet.serve.pyfunc"


def run(pipeline: str, source: str, out: str, model: str | None, params_file: str) -> Path:
    source_path, out_path = Path(source), Path(out)
    if not source_path.exists():
        raise RatchetError(f"{source_path}: no such file or folder")
    if out_path.is_dir():
        raise RatchetError(f"--out {out_path}: is a folder; name the CSV file to write")
    registered = _registered_name(pipeline, Path(params_file))
    uri = _model_uri(registered, model)
    version = _version(uri)
    loaded = _load(uri, version)
    spec = loaded.metadata.metadata["ratchet"]
    from ratchet.families import get_family

    frame, notes = get_family(spec["family"]).read_input(spec, source_path)
    from mlflow.exceptions import MlflowException

    try:  # the loader's model itself: the frame has the model's columns already, parsed with errors by line
        result = loaded.get_raw_model().predict(frame)
    except MlflowException as exc:
        raise RatchetError(f"{source_path}: {_first_line(exc.message)}") from None
    result["model"] = f"{version.name} v{version.version}"
    _write_atomically(result, out_path)
    print(f"predicted {len(result)} row(s) of {source_path} with {version.name} v{version.version} ({uri}) -> "
          f"{out_path}" + "".join(f"; {note}" for note in notes))
    return out_path


def _registered_name(pipeline: str, params_file: Path) -> str:
    """The pipeline's registered model, from params.yaml when there is one (its project's store
    becomes the tracking store unless MLFLOW_TRACKING_URI says otherwise); else the pipeline name."""
    if params_file.is_file():
        from ratchet.config import load_params
        from ratchet.tracking.runs import use_tracking

        params = load_params(params_file)
        use_tracking(params.root)
        return params.pipeline(pipeline).promote.registered_model
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise RatchetError(f"{params_file}: not found, and MLFLOW_TRACKING_URI is not set: run from the project "
                           "folder, or point at its store, e.g. export MLFLOW_TRACKING_URI=sqlite:////path/to/"
                           "project/mlflow.db (or the team's http://host:5000)")
    return _registered_for(pipeline)


def _registered_for(pipeline: str) -> str:
    """Without params.yaml: the registered model whose versions the pipeline `pipeline` trained
    (each version is tagged with it), else a registered model of that name."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        names = sorted({v.name for v in MlflowClient().search_model_versions(
            f"tags.`ratchet.pipeline` = '{pipeline}'")})
    except MlflowException:
        names = []
    if len(names) > 1:
        raise RatchetError(f"pipeline '{pipeline}' registered {', '.join(names)}: name one with --model "
                           f"models:/<name>@champion")
    return names[0] if names else pipeline


def _model_uri(registered: str, model: str | None) -> str:
    """`--model`: a models:/ URI, `@alias`, or a version number; default `@champion`."""
    if model is None:
        return f"models:/{registered}@champion"
    if model.startswith("models:/"):
        return model
    if model.startswith("@"):
        return f"models:/{registered}{model}"
    if model.isdigit():
        return f"models:/{registered}/{model}"
    raise RatchetError(f"--model {model!r}: give models:/<name>@<alias>, models:/<name>/<version>, @<alias> or "
                       "a version number")


def _version(uri: str):
    """The registered version `uri` names (an alias resolved), or one line saying what is missing."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, _, ref = uri.removeprefix("models:/").partition("@")
    client = MlflowClient()
    try:
        if ref:
            return client.get_model_version_by_alias(name, ref)
        name, version = name.rsplit("/", 1)
        return client.get_model_version(name, version)
    except (MlflowException, ValueError) as exc:
        message = exc.message if isinstance(exc, MlflowException) else str(exc)
        raise RatchetError(f"{uri}: not found in the tracking store {mlflow.get_tracking_uri()} "
                           f"({_first_line(message)}); set MLFLOW_TRACKING_URI to the store it was "
                           "registered in") from None


def _load(uri: str, version):
    """The pyfunc model, only if Ratchet's loader reads it (a pt2 network and JSON: nothing
    unpickled, no code from the registry)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    label = f"registered model '{version.name}' v{version.version}"
    try:
        info = mlflow.models.get_model_info(uri)
    except MlflowException as exc:
        raise RatchetError(f"{label}: cannot be read ({_first_line(exc.message)})") from None
    loader = info.flavors.get("python_function", {}).get("loader_module")
    if loader != LOADER or "ratchet" not in (info.metadata or {}):
        raise RatchetError(f"{label}: not a model this version of ratchet logged (loader {loader}); "
                           "train it again to score with it")
    return mlflow.pyfunc.load_model(uri)


def _write_atomically(frame, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        frame.to_csv(tmp, index=frame.index.name is not None, float_format="%.6g")  # index: the line or file
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _first_line(text: str) -> str:
    return str(text).strip().splitlines()[0] if str(text).strip() else ""
