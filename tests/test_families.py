"""The family contract: every registered family runs prepare -> train -> evaluate -> promote at
toy size through the same stages, and the registry refuses a family that leaves a hook out.

A new family is covered by registering it (ratchet/families/__init__.py) and giving it a tiny
section in TINY below: the contract test then runs it like the others.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import mlflow_client, tiny_params, write_params

from ratchet.config import load_params
from ratchet.errors import RatchetError
from ratchet.families import FAMILIES, Family, PreparedMeta, get_family
from ratchet.stages import evaluate, prepare, promote, train
from ratchet.tracking.runs import use_tracking

# family -> the pipeline of conftest.tiny_params() that exercises it
TINY = {"tabular": "tabular", "image": "image", "sequence": "sequence", "multihead": "multihead"}


def test_every_registered_family_has_a_tiny_pipeline_here():
    assert sorted(TINY) == sorted(FAMILIES), "give a new family a tiny pipeline in TINY"


@pytest.mark.slow
@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_a_family_runs_prepare_train_evaluate_promote(project, family_name):
    name = TINY[family_name]
    params = tiny_params(**{f"{name}.train.epochs": 2})
    params["pipelines"] = {name: params["pipelines"][name]}  # this family's pipeline alone
    write_params(project, params)
    loaded = load_params(project / "params.yaml")
    cfg, family = loaded.pipeline(name), get_family(family_name)

    meta = prepare.run(loaded, name)
    assert isinstance(meta, family.Meta) and meta.family == family_name
    assert family.load(cfg.prepare.out_dir).meta == meta  # what train reads is what prepare wrote

    best = train.run(loaded, name)
    assert best["epochs"] == 2 and cfg.train.monitor in best
    history = (cfg.train.out_dir / "history.csv").read_text().splitlines()
    assert len(history) == 3 and {"epoch", "train_loss", "val_loss", cfg.train.monitor} <= set(history[0].split(","))
    assert not cfg.train.checkpoint.exists()  # finished: nothing left to resume
    timings = json.loads((cfg.train.out_dir / "run.json").read_text())["timings"]
    assert "epoch_seconds" not in history[0] and len(timings["epoch_seconds"]) == 2  # wall time: run.json, not the plots

    metrics = evaluate.run(loaded, name)
    assert json.loads(cfg.evaluate.metrics.read_text()) == metrics
    assert cfg.promote.metric in metrics and "\n" not in family.summary(metrics)
    plots = sorted(p.name for p in cfg.evaluate.plots.iterdir())
    assert "history.csv" in plots and "curves.png" in plots and len(plots) >= 3, plots

    result = promote.run(loaded, name)
    assert result["promoted"] and result["version"] == 1
    assert result["score"] == pytest.approx(metrics[cfg.promote.metric], rel=1e-4)  # the gate scores what evaluate did

    run_info = json.loads((cfg.train.out_dir / "run.json").read_text())
    client = mlflow_client(project)
    run = client.get_run(run_info["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["ratchet.family"] == family_name
    assert {f"best_{cfg.train.monitor}", f"test_{cfg.promote.metric}"} <= set(run.data.metrics)
    use_tracking(project)
    served = mlflow.pytorch.load_model(f"models:/{cfg.promote.registered_model}@champion", map_location="cpu")
    example = family.example_input(cfg, meta)
    named = example if isinstance(example, dict) else {"input": example}  # several inputs: named, in order
    with torch.no_grad():
        out = served(*(torch.from_numpy(a) for a in named.values()))
    for head in (out.values() if isinstance(out, dict) else [out]):
        assert head.shape[0] == 2 and torch.isfinite(head).all()
    x, _ = family.gate_data(cfg, family.load(cfg.prepare.out_dir))
    for key, gate_input in (x.items() if isinstance(x, dict) else [("input", x)]):
        assert np.asarray(gate_input[:1]).shape[1:] == named[key].shape[1:]  # the gate feeds what the signature says


@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_a_family_prepares_the_same_bytes_in_another_checkout_folder(project, tmp_path_factory, family_name):
    """A colleague's clone lives in another folder: its prepared data must hash alike, or DVC
    sees other outputs and the runs' data lineage differs. meta.json records its paths relative
    to the project, as params.yaml writes them."""
    name = TINY[family_name]
    elsewhere = tmp_path_factory.mktemp("another-checkout") / "project"
    shutil.copytree(project, elsewhere)
    written = {}
    for root in (project, elsewhere):
        loaded = load_params(root / "params.yaml")
        prepare.run(loaded, name)
        out = loaded.pipeline(name).prepare.out_dir
        written[root] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert written[project].keys() == written[elsewhere].keys()
    assert [p for p in written[project] if written[project][p] != written[elsewhere][p]] == []
    meta = json.loads(written[project][Path("meta.json")])
    assert meta["source"] == str(Path(tiny_params()["pipelines"][name]["data"]["source"]))


def test_an_unknown_family_is_refused_with_the_registered_ones(tmp_path):
    write_params(tmp_path, tiny_params(**{"tabular.family": "audio"}))
    with pytest.raises(RatchetError, match=r"pipelines.tabular: unknown family 'audio'; families: tabular, image"):
        load_params(tmp_path / "params.yaml")


def test_a_family_that_leaves_a_hook_out_fails_when_params_load(tmp_path, monkeypatch):
    """Registering a module whose family implements only `prepare` stops at load time naming
    the hooks it lacks; nothing falls back to another family's behaviour."""
    (tmp_path / "incomplete_family.py").write_text(textwrap.dedent('''
        from ratchet.families.base import Family

        class Incomplete(Family):
            name = "incomplete"

            def prepare(self, cfg):
                return None

        FAMILY = Incomplete()
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(FAMILIES, "incomplete", "incomplete_family")
    get_family.cache_clear()
    try:
        with pytest.raises(RatchetError, match=r"family 'incomplete' \(incomplete_family\): Can't instantiate "
                                               r"abstract class Incomplete .*score"):
            get_family("incomplete")
    finally:
        get_family.cache_clear()
        sys.modules.pop("incomplete_family", None)


def test_every_family_implements_every_hook():
    for name in FAMILIES:
        family = get_family(name)
        assert isinstance(family, Family) and family.name == name
        assert issubclass(family.Meta, PreparedMeta)
        assert family.monitors[0] == "val_loss" and family.gate_metrics
