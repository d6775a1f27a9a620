"""The promotion gate's safety: registered models are loaded without running pickled code."""

from __future__ import annotations

import os
import warnings

import mlflow
import numpy as np
import pytest
import torch
from torch import nn

from ratchet.errors import RatchetError
from ratchet.tracking.registry import load_served_model


class Planted(nn.Module):
    """A model whose unpickling runs a shell command (what a crafted registry entry can do)."""

    marker = ""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x):
        return self.linear(x)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment("gate")
    yield mlflow.MlflowClient(uri, uri)
    mlflow.set_tracking_uri(None)


def _register(model, **options) -> str:
    with mlflow.start_run(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = mlflow.pytorch.log_model(model, name="model", **options)
    return mlflow.register_model(info.model_uri, "planted").version


def test_a_pickle_format_version_is_refused_and_runs_nothing(store, tmp_path):
    marker = tmp_path / "ran"
    Planted.marker = str(marker)
    torch.manual_seed(0)
    good = nn.Sequential(nn.Linear(3, 2)).eval()
    example = np.ones((2, 3), dtype=np.float32)
    pt2 = _register(good, input_example=example, serialization_format="pt2", pip_requirements=["torch"])
    planted = _register(Planted(), serialization_format="pickle", pip_requirements=["torch"])
    assert not marker.exists()  # saving did not run it either

    with pytest.raises(RatchetError) as info:
        load_served_model(store, "planted", planted)
    assert str(info.value) == (f"registered model 'planted' v{planted}: is in MLflow's pickle format, whose loading "
                               "runs code stored in the registry; refusing it (only pt2, torch.export's format, "
                               "is loaded)")
    assert not marker.exists()

    loaded = load_served_model(store, "planted", pt2)  # the project's own format loads
    x = torch.from_numpy(example)
    torch.testing.assert_close(loaded(x), good(x))


@pytest.mark.parametrize("out_dir,message", [
    (".", "is the project folder; a stage replaces its output on every run"),
    ("data", "holds the input {root}/data/raw/table.csv (data.source); an output is replaced on every run, so it "
             "must not touch the data it is made from"),
    ("src", "is the project's src; a stage replaces its output on every run"),
    ("../elsewhere", "is outside the project ({root}); outputs are written inside it"),
])
def test_an_output_path_that_would_destroy_inputs_or_the_project_is_refused_before_anything(project, out_dir,
                                                                                             message):
    from conftest import ratchet, tiny_params, write_params

    (project / "src").mkdir()
    (project / "src/keep.py").write_text("# the project's code\n")
    write_params(project, tiny_params(**{"tabular.prepare.out_dir": out_dir}))
    before = sorted(p.relative_to(project) for p in project.rglob("*"))
    proc = ratchet(project, "prepare", "tabular", check=False)
    target = (project / out_dir).resolve()
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: params.yaml: pipelines.tabular.prepare.out_dir: {target} "
                                   + message.format(root=project))
    assert sorted(p.relative_to(project) for p in project.rglob("*")) == before  # nothing deleted or written


def test_a_stage_replaces_only_a_directory_it_wrote(project):
    """A foreign folder at an output path (not made by a stage: no marker) is refused in one line
    and left whole; the folder a stage wrote is replaced on the next run."""
    from conftest import ratchet, tiny_params, write_params

    foreign = project / "results"
    (foreign / "notes").mkdir(parents=True)
    (foreign / "notes/thesis.tex").write_text("months of work\n")
    write_params(project, tiny_params(**{"tabular.prepare.out_dir": "results"}))
    proc = ratchet(project, "prepare", "tabular", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {foreign}: not an output a ratchet stage wrote (no .ratchet-output in "
                                   "it), so it is not replaced: move it away or choose another output path")
    assert sorted(p.name for p in foreign.rglob("*")) == ["notes", "thesis.tex"]
    assert [p.name for p in project.iterdir() if p.name.startswith(".results")] == []  # no temporary left

    write_params(project, tiny_params(**{"tabular.prepare.out_dir": "results/prepared"}))
    ratchet(project, "prepare", "tabular")
    written = project / "results/prepared"
    assert (written / ".ratchet-output").is_file() and (written / "meta.json").is_file()
    (written / "stale.npy").write_bytes(b"")
    ratchet(project, "prepare", "tabular")  # its own output: replaced as a whole
    assert not (written / "stale.npy").exists() and (written / "meta.json").is_file()
    assert (foreign / "notes/thesis.tex").read_text() == "months of work\n"


def _run(project, *stages, **overrides):
    from conftest import tiny_params, write_params

    from ratchet.cli import main

    write_params(project, tiny_params(**{"tabular.train.epochs": 2, **overrides}))
    for stage in stages:
        assert main([stage, "tabular", "--params", str(project / "params.yaml")]) == 0


def test_the_gate_leaves_out_test_rows_the_champion_trained_on(project):
    """A new seed draws a new split: part of its test rows were the champion's training or
    validation rows. Those are not scored, for either model; the count is in promotion.json."""
    import json

    from conftest import load_prepared

    _run(project, "prepare", "train", "promote")
    first = load_prepared(project / "data/prepared/tabular")
    champion_rows = set(first.array("train_ids").tolist()) | set(first.array("val_ids").tolist())
    _run(project, "prepare", "train", "promote", **{"tabular.seed": 8, "tabular.promote.min_samples": 5})
    second = load_prepared(project / "data/prepared/tabular")
    test_rows = second.array("test_ids").tolist()
    seen = sum(row in champion_rows for row in test_rows)
    assert 0 < seen < len(test_rows)
    promotion = json.loads((project / "reports/tabular/promotion.json").read_text())
    assert promotion["overlap_excluded"] == {"challenger": 0, "champion": seen, "total": seen}
    assert promotion["scored_on"] == len(test_rows) - seen
    assert f"on {len(test_rows) - seen} of {len(test_rows)} test samples ({seen} excluded" in promotion["reason"]

    # too few unseen rows: the gate refuses in one line, and the champion stays
    from conftest import mlflow_client, ratchet, tiny_params, write_params

    write_params(project, tiny_params(**{"tabular.train.epochs": 2, "tabular.seed": 8,
                                         "tabular.promote.min_samples": len(test_rows)}))
    proc = ratchet(project, "promote", "tabular", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: registered model 'tabular': only {len(test_rows) - seen} of {len(test_rows)} test samples are "
        f"unseen by both models ({seen} excluded as training or validation data of a model); promote.min_samples is "
        f"{len(test_rows)}: the gate refuses to compare them (hold out new test data)")
    champion = mlflow_client(project).get_model_version_by_alias("tabular", "champion").version
    assert int(champion) == promotion["champion_after"]
    assert json.loads((project / "reports/tabular/promotion.json").read_text()) == promotion  # not rewritten


def _two_pipelines(project):
    """Two pipelines of one registered model on the same prepared data (two people, or a schedule
    and a person, training the same model)."""
    import copy

    from conftest import tiny_params

    params = tiny_params()
    b = copy.deepcopy(params["pipelines"]["tabular"])
    b["train"].update(out_dir="models/b", checkpoint="checkpoints/b.pt")
    b["evaluate"].update(out_dir="reports/b/evaluation", metrics="reports/b/metrics.json", plots="reports/b/plots")
    b["promote"]["out"] = "reports/b/promotion.json"
    params["pipelines"]["b"] = b
    return params


@pytest.mark.slow
def test_two_promotions_at_once_leave_the_better_version_as_champion_in_either_order(project):
    import json
    import subprocess
    import sys
    import time

    from conftest import PATIENCE, mlflow_client, write_params

    from ratchet.cli import main

    params = _two_pipelines(project)
    train = {"tabular": params["pipelines"]["tabular"]["train"], "b": params["pipelines"]["b"]["train"]}

    def run(stage, name, **train_changes):
        train[name].update(train_changes)
        write_params(project, params)
        assert main([stage, name, "--params", str(project / "params.yaml")]) == 0

    run("prepare", "tabular")
    run("train", "tabular", epochs=1, optimizer={"name": "adam", "lr": 1e-6})  # v1: barely trained
    run("promote", "tabular")
    run("train", "b", epochs=8, optimizer={"name": "adam", "lr": 0.01})  # v2
    run("train", "tabular", epochs=2, optimizer={"name": "adam", "lr": 0.003})  # v3
    client = mlflow_client(project)
    scores = {}
    for order in (("tabular", "b"), ("b", "tabular")):
        client.set_registered_model_alias("tabular", "champion", "1")
        procs = []
        for name in order:
            procs.append(subprocess.Popen([sys.executable, "-m", "ratchet", "promote", name, "--params",
                                           str(project / "params.yaml")], cwd=project, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
            time.sleep(0.3)
        outputs = [p.communicate(timeout=PATIENCE)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        for name, out in (("tabular", "reports/tabular/promotion.json"), ("b", "reports/b/promotion.json")):
            record = json.loads((project / out).read_text())
            scores[record["version"]] = record["score"]
        best = max((2, 3), key=lambda v: scores[v])
        assert scores[2] != scores[3]
        assert int(client.get_model_version_by_alias("tabular", "champion").version) == best, (order, scores, outputs)
        assert [m.name for m in client.search_registered_models()] == ["tabular"]  # the lock is gone
