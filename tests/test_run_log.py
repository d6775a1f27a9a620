"""What a person reads after `make run`: the flow's log (where the run is, not DVC's advice), the
summary's pointer to the MLflow UI, and `dvc plots show` drawing every plot with its data."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_params, write_params

from pipelines.retrain import shown, summary

# `dvc repro train@tabular` after prepare@tabular, as DVC 3 prints it (blank lines dropped, as
# the flow drops them)
DVC_OUTPUT = """\
Stage 'prepare@tabular' didn't change, skipping
Running stage 'train@tabular':
> ratchet train tabular
epoch   1/3  train_loss 1.0741  val_loss 0.8709  val_accuracy 0.5778  val_f1_macro 0.5659  lr 1.00e-02  (0.46 s)
trained tabular: best epoch 3/3, val_loss 0.6327 -> /p/models/tabular
Generating lock file 'dvc.lock'
Updating lock file 'dvc.lock'
To track the changes with git, run:
\tgit add dvc.lock models/.gitignore
To enable auto staging, run:
\tdvc config core.autostage true
Use `dvc push` to send your updates to remote storage.
Data and pipelines are up to date."""


def test_the_log_keeps_the_stages_lines_and_drops_dvcs_advice():
    kept = [line for line in DVC_OUTPUT.splitlines() if shown(line, "train@tabular")]
    assert kept == DVC_OUTPUT.splitlines()[1:5]
    # the step's own stage, already up to date, still says so
    assert shown("Stage 'train@tabular' didn't change, skipping", "train@tabular")
    for line in ("error: train@tabular: data/t.csv: column 'ph' is not numeric (line 6: 'high')",
                 "ERROR: failed to reproduce 'train@tabular': failed to run: ratchet train tabular, exited with 2",
                 "Traceback (most recent call last):"):
        assert shown(line, "train@tabular"), line


def _ran(project, tracking_uri: str | None) -> str:
    """The summary of a finished tabular run (its files written as the stages write them)."""
    write_params(project, tiny_params())
    (project / "reports/tabular/evaluation").mkdir(parents=True)
    (project / "reports/tabular/evaluation/classification_report.txt").write_text("report\n")
    (project / "reports/tabular/metrics.json").write_text(json.dumps({"accuracy": 0.9, "f1_macro": 0.8, "samples": 45}))
    (project / "models/tabular").mkdir(parents=True)
    (project / "models/tabular/run.json").write_text(json.dumps({"run_id": "abc123", "experiment": "tabular",
                                                                 "experiment_id": "4"}))
    promotion = {"registered_model": "tabular", "version": 2, "promoted": True, "champion_after": 2,
                 "reason": "better"}
    return summary({"tabular": promotion}, str(project / "params.yaml"), tracking_uri)


@pytest.mark.parametrize("uri", ["http://mlflow.internal:5000", "https://mlflow.example.com/"])
def test_the_summary_links_the_tracking_servers_pages(tmp_path, uri):
    text = _ran(tmp_path, uri)
    base = uri.rstrip("/")
    assert (f"MLflow run    abc123 in experiment 'tabular': {base}/#/experiments/4/runs/abc123"
            "?workflowType=machine_learning") in text
    assert f"models:/tabular@champion (v2)   {base}/#/models/tabular" in text
    assert "make ui" not in text and "127.0.0.1" not in text


@pytest.mark.parametrize("uri", [None, "sqlite:///elsewhere/mlflow.db", "file:///tmp/mlruns"])
def test_the_summary_sends_a_local_store_to_make_ui(tmp_path, uri):
    text = _ran(tmp_path, uri)
    assert ("MLflow run    abc123 in experiment 'tabular': make ui -> http://127.0.0.1:5000/#/experiments/4/runs/"
            "abc123?workflowType=machine_learning") in text
    assert "#/models" not in text
