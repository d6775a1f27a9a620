"""The MLflow UI shows what a pipeline tracked: Debian's headless Chromium, driven by Playwright,
over `mlflow server` on a tiny project's store (prepare -> train -> evaluate -> promote, 3 epochs).

    .venv/bin/python -m pytest -q -m browser tests/test_browser.py
    RATCHET_SCREENSHOTS=/tmp/shots .venv/bin/python -m pytest -q -m browser tests/test_browser.py  # keep the PNGs

Expected values are read from the store (run name, params, metric history, artifact, alias,
promotion reason), so the check follows whatever the stages record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlparse

import pytest
from browser_ui import CHROMIUM, MlflowUI, browser_page, check_champion, listening, mlflow_server
from conftest import tiny_params, write_params

pytestmark = [pytest.mark.browser, pytest.mark.slow]

EPOCHS = 3


@pytest.fixture
def tracked(project: Path) -> Path:
    """The tiny project with one tabular run trained, evaluated and promoted to @champion."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: run the tests with `make test`, whose `chromium` step installs "
                    "Debian's headless Chromium (apt-get install -y chromium)", pytrace=False)
    from ratchet.cli import main

    write_params(project, tiny_params(**{"tabular.train.epochs": EPOCHS}))
    for stage in ("prepare", "train", "evaluate", "promote"):
        assert main([stage, "tabular", "--params", str(project / "params.yaml")]) == 0
    return project


def test_the_mlflow_ui_shows_the_run_its_metric_chart_and_the_champion_with_its_reason(tracked, tmp_path):
    shots = [tmp_path / "screenshots"] + ([Path(os.environ["RATCHET_SCREENSHOTS"])]
                                          if os.environ.get("RATCHET_SCREENSHOTS") else [])
    db = tracked / "mlflow.db"
    model = tiny_params()["pipelines"]["tabular"]["promote"]["registered_model"]
    with mlflow_server(db, tmp_path / "mlflow-server.log") as base, browser_page() as page:
        port = urlparse(base).port
        seen = check_champion(MlflowUI(page, base, shots), f"sqlite:///{db}", model, metric="val_loss",
                              params=("train.optimizer.lr", "train.epochs"), artifact="plots/curves.png")
    assert not listening(port)  # the server is stopped, nothing left on its port

    trained = json.loads((tracked / "models/tabular/run.json").read_text())
    assert seen["run"].info.run_id == trained["run_id"]  # the champion is the run this project trained
    assert seen["steps"] == EPOCHS  # the chart's points were the epochs' val_loss
    assert seen["reason"].startswith("first model")
    for folder in shots:
        names = sorted(p.name for p in folder.glob("*.png") if p.stat().st_size > 10_000)
        assert names == ["experiment-runs.png", "model-version.png", "registered-model.png", "run-artifact.png",
                         "run-metric-val_loss.png", "run-params.png"]
