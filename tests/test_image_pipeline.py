"""The image family through train, evaluate and promote: reports, DDP, serving, fine-tuning."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import load_prepared, IMAGE_CLASSES, make_image_tree, mlflow_client, ratchet, runs_by_status, tiny_params, write_params



@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny image project trained, evaluated and promoted once (course CNN with BatchNorm)."""
    from ratchet.cli import main

    project = tmp_path_factory.mktemp("image")
    make_image_tree(project / "data/raw/images", per_class=16)
    write_params(project, tiny_params(**{"image.model.batchnorm": True, "image.train.epochs": 4}))
    for stage in ("prepare", "train", "evaluate", "promote"):  # in-process: no start-up per stage
        assert main([stage, "image", "--params", str(project / "params.yaml")]) == 0
    return project


def test_evaluation_reports_per_class_results_under_class_names(trained):
    metrics = json.loads((trained / "reports/image/metrics.json").read_text())
    assert list(metrics["per_class"]) == sorted(IMAGE_CLASSES)
    assert sum(row["support"] for row in metrics["per_class"].values()) == metrics["samples"] == 16
    for avg in ("micro", "macro", "weighted"):
        assert 0 <= metrics[f"f1_{avg}"] <= 1
    report = (trained / "reports/image/evaluation/classification_report.txt").read_text()
    assert "Zürich" in report and "blue sky" in report
    with open(trained / "reports/image/evaluation/predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["actual"] for r in rows} == set(IMAGE_CLASSES) and len(rows) == 16
    assert all((trained / "data/raw/images" / r["file"]).is_file() for r in rows)
    wrong = sum(r["actual"] != r["predicted"] for r in rows)
    assert wrong == round(16 * (1 - metrics["accuracy"]))


def test_run_logs_augmentation_grid_misclassified_grid_and_parameter_count(trained):
    run_info = json.loads((trained / "models/image/run.json").read_text())
    client = mlflow_client(trained)
    run = client.get_run(run_info["run_id"])
    assert run.info.status == "FINISHED"
    assert int(run.data.params["parameters"]) == sum(
        v.numel() for k, v in torch.load(trained / "models/image/model.pt")["model"].items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    artifacts = {a.path for d in ("plots", "evaluation") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"plots/augmented_samples.png", "evaluation/misclassified.png", "evaluation/confusion_matrix.png",
            "evaluation/classification_report.json"} <= artifacts
    keys = set(run.data.metrics)
    assert "test_class_blue sky_f1" in keys and "test_class_Z_rich_f1" in keys  # MLflow-safe names


def test_registered_model_takes_raw_uint8_images_and_matches_evaluation(trained):
    """The served model normalises by itself: raw test images in, the evaluate stage's predictions out."""
    prepared = load_prepared(trained / "data/prepared/image")
    uri = f"sqlite:///{trained / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pytorch.load_model("models:/image@champion", map_location="cpu")
    with torch.no_grad():
        served = model(torch.from_numpy(np.array(prepared.array("test_x")))).argmax(1).tolist()
    with open(trained / "reports/image/evaluation/predictions.csv", newline="") as f:
        evaluated = [r["predicted"] for r in csv.DictReader(f)]
    classes = prepared.meta.classes
    assert [classes[p] for p in served] == evaluated
    promotion = json.loads((trained / "reports/image/promotion.json").read_text())
    assert promotion["promoted"] and promotion["version"] == 1


@pytest.mark.slow
def test_per_class_report_under_two_processes_equals_one(trained, tmp_path):
    one = json.loads((trained / "reports/image/metrics.json").read_text())
    project = tmp_path / "copy"
    shutil.copytree(trained, project)  # the same trained model and test split, its own outputs
    write_params(project, tiny_params(**{"image.model.batchnorm": True, "image.train.epochs": 4,
                                         "image.evaluate.nproc": 2, "image.evaluate.batch_size": 3}))
    ratchet(project, "evaluate", "image")
    two = json.loads((project / "reports/image/metrics.json").read_text())
    assert two["per_class"] == one["per_class"] and two["samples"] == one["samples"] == 16
    assert {k: v for k, v in two.items() if k != "loss"} == {k: v for k, v in one.items() if k != "loss"}
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)


@pytest.mark.parametrize("source", ["registry", "file"])
def test_fine_tuning_with_frozen_features_changes_only_the_unfrozen_parameters(trained, tmp_path, capsys, source):
    from ratchet.cli import main

    # A new task with three classes (one fewer): start from the trained CNN, keep `features` fixed.
    shutil.copy(trained / "mlflow.db", tmp_path / "mlflow.db")
    shutil.copytree(trained / "mlartifacts", tmp_path / "mlartifacts")
    make_image_tree(tmp_path / "data/raw/images", per_class=12, classes=IMAGE_CLASSES[:3], seed=5)
    init_from = "models:/image@champion" if source == "registry" else str(trained / "models/image/model.pt")
    write_params(tmp_path, tiny_params(**{
        "image.model.batchnorm": True, "image.train.epochs": 3, "image.train.init_from": init_from,
        "image.train.freeze": ["features"], "image.promote.registered_model": "image_three",
    }))
    for stage in ("prepare", "train"):
        assert main([stage, "image", "--params", str(tmp_path / "params.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"initialised from {init_from}; fresh: classifier.0.bias, classifier.0.weight" in out

    before = torch.load(trained / "models/image/model.pt")["model"]
    after = torch.load(tmp_path / "models/image/model.pt")["model"]
    for key, value in after.items():
        if key.startswith("features."):  # weights and BatchNorm statistics alike
            assert torch.equal(value, before[key]), key
    assert after["classifier.0.weight"].shape == (3, before["classifier.0.weight"].shape[1])
    run = mlflow_client(tmp_path).get_run(json.loads((tmp_path / "models/image/run.json").read_text())["run_id"])
    assert int(run.data.params["parameters_frozen"]) == sum(
        v.numel() for k, v in before.items() if k.startswith("features.") and "running" not in k
        and "num_batches" not in k)
    assert run.data.tags["ratchet.init_from"] == init_from


@pytest.mark.parametrize("overrides,message", [
    ({"image.train.init_from": "models:/nothing@champion"}, "train.init_from models:/nothing@champion:"),
    ({"image.train.init_from": "missing/model.pt"}, "train.init_from missing/model.pt: file not found"),
    ({"image.train.init_from": "models:/image"}, "expected models:/<name>@<alias> or models:/<name>/<version>"),
    ({"image.train.freeze": ["encoder"]},
     "train.freeze: this network has no module 'encoder' (top-level modules: features, classifier)"),
    ({"image.train.freeze": ["features", "classifier"]}, "every parameter would be frozen"),
    ({"image.data.size": [8, 8], "image.model": {"name": "lenet5"}}, "model.name lenet5: input size 8x8 is too small"),
])
def test_training_setup_errors_name_the_key_and_leave_nothing(trained, tmp_path, capsys, overrides, message):
    from ratchet.cli import main

    make_image_tree(tmp_path / "data/raw/images", per_class=8)
    shutil.copy(trained / "mlflow.db", tmp_path / "mlflow.db")
    write_params(tmp_path, tiny_params(**overrides))
    assert main(["prepare", "image", "--params", str(tmp_path / "params.yaml")]) == 0
    capsys.readouterr()
    assert main(["train", "image", "--params", str(tmp_path / "params.yaml")]) == 2  # in-process: fast
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert runs_by_status(tmp_path).get("RUNNING", 0) == 0
    assert not (tmp_path / "models/image").exists()
