"""The registered model as users meet it: `ratchet predict` for every family, the pyfunc model
through MLflow (named columns, float64, class names), `mlflow models serve` on a real port, and
what the MLflow UI reads (experiment kind, run names, metric names, the promotion reason)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import (
    PATIENCE, make_csv, make_group_tree, make_image_tree, make_series, mlflow_client, tiny_multihead_section, tiny_params,
    write_params,
)

from ratchet.cli import main as ratchet_main
from ratchet.config import load_params
from ratchet.stages import prepare, promote, train

PIPELINES = ("tabular", "image", "sequence", "multihead", "multiinput")
REGISTERED = {"tabular": "tabular", "image": "image", "sequence": "sequence", "multihead": "multihead",
              "multiinput": "omniglot_in"}
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """A project whose five pipelines each have a trained, registered `@champion`."""
    project = tmp_path_factory.mktemp("served")
    make_csv(project / "data/raw/table.csv")
    make_image_tree(project / "data/raw/images")
    make_series(project / "data/raw/series.csv")
    make_group_tree(project / "data/raw/groups")
    params = tiny_params()
    multiinput = tiny_multihead_section(inputs=["image", "group"], heads={"class": 1.0})
    for section, path in (("prepare", "out_dir"), ("train", "out_dir"), ("train", "checkpoint")):
        multiinput[section][path] = multiinput[section][path].replace("multihead", "multiinput")
    multiinput["evaluate"] = {k: v.replace("multihead", "multiinput") if isinstance(v, str) else v
                              for k, v in multiinput["evaluate"].items()}
    multiinput["promote"] = {"registered_model": "omniglot_in", "metric": "class.f1_macro",  # not the pipeline's name
                             "out": "reports/multiinput/promotion.json"}
    params["pipelines"]["multiinput"] = multiinput
    write_params(project, params)
    loaded = load_params(project / "params.yaml")
    for name in PIPELINES:
        for stage in (prepare, train, promote):
            stage.run(loaded, name)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    return project


def store(project: Path) -> str:
    return f"sqlite:///{project / 'mlflow.db'}"


def predict(project: Path, monkeypatch, *args: str) -> int:
    """`ratchet predict ...` from another folder (no params.yaml there), the store named by
    MLFLOW_TRACKING_URI, as a user outside the project runs it."""
    elsewhere = project.parent / f"{project.name}-elsewhere"
    elsewhere.mkdir(exist_ok=True)
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store(project))
    return ratchet_main(["predict", *args])


def test_predict_scores_csv_rows_by_column_name_from_another_folder(served, tmp_path):
    rows = pd.read_csv(served / "data/raw/table.csv").head(40)
    shuffled = rows[["label", *reversed([c for c in rows.columns if c != "label"])]].assign(id=range(40))
    shuffled.to_csv(tmp_path / "new.csv", index=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-m", "ratchet", "predict", "tabular", str(tmp_path / "new.csv"),
                           "--out", str(tmp_path / "scored.csv")], cwd=elsewhere, capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": store(served)}, timeout=PATIENCE)
    assert proc.returncode == 0, proc.stderr
    assert "; ignored columns (not model inputs): label, id" in proc.stdout
    scored = pd.read_csv(tmp_path / "scored.csv")
    assert len(scored) == 40 and list(scored["line"]) == list(range(2, 42))
    classes = ["class_0", "class_1", "class_2"]
    assert list(scored.columns) == ["line", "label", "probability", *(f"prob_{c}" for c in classes), "model"]
    assert set(scored["label"]) <= set(classes) and (scored["model"] == "tabular v1").all()
    probs = scored[[f"prob_{c}" for c in classes]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    assert (np.asarray(classes)[probs.argmax(axis=1)] == scored["label"]).all()
    assert (scored["label"] == rows["label"]).mean() > 0.6  # a trained model, not noise


def test_predict_scores_a_folder_of_images_of_any_size_and_mode(served, tmp_path, monkeypatch):
    from PIL import Image

    files = sorted((served / "data/raw/images").rglob("*.*"))[:25]
    truth = {}
    for i, f in enumerate(files):  # a nested tree; some bigger, some palette images
        target = tmp_path / "photos" / f"batch{i % 2}" / f"{i:02d}{f.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(f)
        if i % 5 == 1:
            image = image.resize((97, 61))
        if i % 5 == 2:
            image = image.convert("RGB").convert("P")
            target = target.with_suffix(".png")
        image.save(target)
        truth[str(target.relative_to(tmp_path / "photos"))] = f.parent.name
    (tmp_path / "photos/notes.txt").write_text("not an image")
    assert predict(served, monkeypatch, "image", str(tmp_path / "photos"), "--out", str(tmp_path / "labels.csv")) == 0
    scored = pd.read_csv(tmp_path / "labels.csv")
    assert len(scored) == 25 and sorted(scored["file"]) == sorted(truth) and scored["file"].iloc[0] == "batch0/00.png"
    classes = json.loads((served / "data/prepared/image/meta.json").read_text())["classes"]
    assert set(scored["label"]) <= set(classes) and {f"prob_{c}" for c in classes} <= set(scored.columns)
    assert (scored["label"] == scored["file"].map(truth)).mean() > 0.5


def test_predict_forecasts_after_the_last_window_of_a_series(served, tmp_path, monkeypatch):
    series = pd.read_csv(served / "data/raw/series.csv").iloc[100:160]
    series[["temp", "timestamp", "value"]].to_csv(tmp_path / "recent.csv", index=False)  # columns in any order
    assert predict(served, monkeypatch, "sequence", str(tmp_path / "recent.csv"), "--out",
                   str(tmp_path / "forecast.csv")) == 0
    forecast = pd.read_csv(tmp_path / "forecast.csv")
    last = pd.Timestamp(series["timestamp"].iloc[-1])
    assert list(forecast.columns) == ["step", "timestamp", "value", "model"]
    assert list(forecast["step"]) == [1, 2, 3]
    assert [pd.Timestamp(t) for t in forecast["timestamp"]] == [last + pd.Timedelta(hours=k) for k in (1, 2, 3)]
    assert forecast["value"].between(series["value"].min() - 20, series["value"].max() + 20).all()

    gap = series.drop(series.index[-5])  # the last window is not consecutive hours
    gap.to_csv(tmp_path / "gap.csv", index=False)
    assert predict(served, monkeypatch, "sequence", str(tmp_path / "gap.csv"), "--out",
                   str(tmp_path / "gap_out.csv")) == 2
    assert not (tmp_path / "gap_out.csv").exists()


def test_predict_answers_every_head_and_reads_the_group_from_folders(served, tmp_path, monkeypatch, capsys):
    source = served / "data/raw/groups"
    assert predict(served, monkeypatch, "multihead", str(source), "--out", str(tmp_path / "heads.csv")) == 0
    heads = pd.read_csv(tmp_path / "heads.csv")
    assert len(heads) == 36
    assert {"class_label", "class_probability", "class_prob_Beta/character02", "group_label",
            "group_prob_Alpha"} <= set(heads.columns)
    assert (heads["group_label"] == heads["file"].str.split("/").str[0]).mean() > 0.6

    # from another folder, the pipeline's name finds the registered model its versions were trained by
    assert predict(served, monkeypatch, "multiinput", str(source / "Beta"), "--out", str(tmp_path / "in.csv")) == 0
    scored = pd.read_csv(tmp_path / "in.csv")
    assert len(scored) == 18 and "group_label" not in scored.columns and "class_label" in scored.columns
    assert (scored["model"] == "omniglot_in v1").all()
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(next(source.rglob("*.png")), loose / "x.png")
    capsys.readouterr()
    assert predict(served, monkeypatch, "multiinput", str(loose), "--out", str(tmp_path / "none.csv")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "x.png: no folder named after a group above it" in err
    assert not (tmp_path / "none.csv").exists()


def test_bad_input_is_one_line_exit_2_and_no_output_file(served, tmp_path):
    rows = pd.read_csv(served / "data/raw/table.csv").head(10)
    rows.drop(columns=["f3"]).to_csv(tmp_path / "missing.csv", index=False)
    bad = rows.astype({"f1": object})
    bad.loc[4, "f1"] = "n/a?"
    bad.to_csv(tmp_path / "text.csv", index=False)
    for name, message in (("missing.csv", "missing.csv: column 'f3' not found"),
                          ("text.csv", "text.csv: column 'f1', line 6: 'n/a?' is not a number")):
        proc = subprocess.run([sys.executable, "-m", "ratchet", "predict", "tabular", str(tmp_path / name), "--out",
                               str(tmp_path / "out" / name), "--params", str(served / "params.yaml")],
                              cwd=served, capture_output=True, text=True, timeout=PATIENCE)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
        assert not (tmp_path / "out" / name).exists() and not list((tmp_path / "out").glob(".*"))


def _image_b64(pixels: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def test_pyfunc_takes_named_float64_columns_and_float_images(served):
    import mlflow

    mlflow.set_tracking_uri(store(served))
    mlflow.set_registry_uri(store(served))
    model = mlflow.pyfunc.load_model("models:/tabular@champion")
    rows = pd.read_csv(served / "data/raw/table.csv").head(8).drop(columns="label")
    assert (rows.dtypes == "float64").all()
    ordered = model.predict(rows)
    reordered = model.predict(rows[list(reversed(rows.columns))].assign(extra=1.0))
    pd.testing.assert_frame_equal(ordered, reordered)
    assert set(ordered["label"]) <= {"class_0", "class_1", "class_2"}
    signature = model.metadata.signature
    assert signature.inputs.input_names() == [f"f{i}" for i in range(6)]
    assert [c.type.name for c in signature.inputs.inputs] == ["double"] * 6

    images = mlflow.pyfunc.load_model("models:/image@champion")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    out = images.predict(pd.DataFrame({"image": [_image_b64(pixels),
                                                 _image_b64((pixels / 255).astype(np.float32), "TIFF", "F")]}))
    probs = out.filter(like="prob_").to_numpy()
    assert np.allclose(probs[0], probs[1], atol=0.02)  # a float image in [0, 1] is the same picture, not black
    black = images.predict(pd.DataFrame({"image": [_image_b64(np.zeros((20, 20), np.uint8))]}))
    assert not np.allclose(black.filter(like="prob_").to_numpy()[0], probs[1], atol=0.02)

    forecaster = mlflow.pyfunc.load_model("models:/sequence@champion")
    series = pd.read_csv(served / "data/raw/series.csv").iloc[-30:]
    swapped = series.rename(columns={"value": "temp", "temp": "value"})[["timestamp", "value", "temp"]]
    a = forecaster.predict(series)
    b = forecaster.predict(swapped.rename(columns={"value": "temp", "temp": "value"}))
    pd.testing.assert_frame_equal(a, b)  # matched by name: the same columns in another order
    assert not np.allclose(a["value"], forecaster.predict(swapped)["value"])  # swapped contents: another forecast


def test_registered_models_load_without_unpickling_and_keep_their_weights(served):
    import mlflow
    import torch

    from ratchet.tracking.registry import load_served_model

    client = mlflow_client(served)
    mlflow.set_tracking_uri(store(served))
    mlflow.set_registry_uri(store(served))
    for name in REGISTERED.values():
        version = client.get_model_version_by_alias(name, "champion")
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}"))
        mlmodel = (local / "MLmodel").read_text()
        assert "loader_module: ratchet.serve.pyfunc" in mlmodel and "cloudpickle" not in mlmodel
        files = sorted(p.name for p in (local / "data").rglob("*") if p.is_file())
        assert files == ["model.pt2", "serving.json"], files
        net = load_served_model(client, name, version.version)
        assert isinstance(net, torch.nn.Module) and len(net.state_dict()) > 0
    checkpoint = mlflow.artifacts.download_artifacts(run_id=client.get_model_version_by_alias(
        "tabular", "champion").run_id, artifact_path="checkpoint/model.pt")
    saved = torch.load(checkpoint, weights_only=True)  # fine-tuning reads these (train.init_from)
    assert any(k.endswith("weight") for k in saved["model"])


def test_the_ui_reads_model_training_runs_named_for_what_they_made(served):
    client = mlflow_client(served)
    exp = client.get_experiment_by_name("tabular")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([exp.experiment_id])
    epochs = int(run.data.metrics["epochs"])
    assert run.info.run_name == f"tabular v1, {epochs} epochs"
    assert {"best_epoch", "epochs", "best_val_loss"} <= set(run.data.metrics)
    assert not [k for k in run.data.metrics if k.startswith("best_best") or k == "best_epochs"]
    version = client.get_model_version("tabular", "1")
    assert version.description.startswith("Promoted: first model: no @champion yet (f1_macro ")
    assert max(len(v) for v in version.tags.values() if v) < 400  # no tag crowds the registry's view
    assert len(version.tags["ratchet.input.sha256"]) == 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: str, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=PATIENCE) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _requests(served: Path) -> dict[str, pd.DataFrame]:
    """One request frame per registered model: what a client of the HTTP endpoint sends."""
    table = pd.read_csv(served / "data/raw/table.csv").head(3).drop(columns="label")
    images = sorted((served / "data/raw/images").rglob("*.png"))[:2]
    groups = sorted((served / "data/raw/groups/Alpha").rglob("*.png"))[:2]
    b64 = [base64.b64encode(p.read_bytes()).decode() for p in images]
    g64 = [base64.b64encode(p.read_bytes()).decode() for p in groups]
    return {"tabular": table, "image": pd.DataFrame({"image": b64}),
            "sequence": pd.read_csv(served / "data/raw/series.csv").iloc[-24:],
            "multihead": pd.DataFrame({"image": g64}),
            "omniglot_in": pd.DataFrame({"image": g64, "group": ["Alpha", "Alpha"]})}


@pytest.mark.slow
def test_mlflow_models_serve_answers_json_and_csv_with_class_names(served):
    import mlflow

    mlflow.set_tracking_uri(store(served))
    mlflow.set_registry_uri(store(served))
    env = {**os.environ, "MLFLOW_TRACKING_URI": store(served), "PATH": f"{BIN}:{os.environ['PATH']}"}
    ports = {name: _free_port() for name in ("tabular", "image", "sequence", "multihead")}  # a server per family
    servers = {name: subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion",
                                       "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True)
               for name, port in ports.items()}
    try:
        deadline = time.monotonic() + PATIENCE
        for name, port in ports.items():
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                    break
                except OSError:
                    assert servers[name].poll() is None, f"mlflow models serve {name} exited"
                    assert time.monotonic() < deadline, f"mlflow models serve {name} did not answer"
                    time.sleep(1)
        for name, frame in _requests(served).items():
            if name not in ports:
                continue
            url = f"http://127.0.0.1:{ports[name]}/invocations"
            expected = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(frame)
            as_json = json.dumps({"dataframe_split": json.loads(frame.to_json(orient="split", index=False))})
            for body, kind in ((frame.to_csv(index=False), "text/csv"), (as_json, "application/json")):
                status, answer = _post(url, body, kind)
                assert status == 200, (name, kind, answer)
                got = pd.DataFrame(answer["predictions"])
                assert list(got.columns) == list(expected.columns), (name, kind)
                label = "step" if name == "sequence" else next(c for c in got.columns if c.endswith("label"))
                assert list(got[label]) == list(expected[label]), (name, kind)
        status, answer = _post(f"http://127.0.0.1:{ports['tabular']}/invocations",
                               _requests(served)["tabular"].drop(columns="f2").to_csv(index=False), "text/csv")
        assert status == 400 and "missing inputs ['f2']" in answer["message"]
    finally:
        for proc in servers.values():
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in servers.values():
            proc.wait(timeout=30)
