"""Drive the MLflow UI headless: Debian's Chromium (/usr/bin/chromium) through Playwright.

Shared by tests/test_browser.py (a tiny tracked run in a temporary project) and `make screenshots`
(the project's own store after `make run`, screenshots into docs/):

    .venv/bin/python tests/browser_ui.py --root . --out docs

Every check reads what it expects from the tracking store and waits for the UI to show it: the
UI is a React single-page app with hash routes (`/#/experiments/<id>`, `/#/models/<name>`) that
takes seconds to paint on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from pipelines.retrain import MODEL_TRAINING_VIEW

CHROMIUM = Path("/usr/bin/chromium")
# Playwright adds --headless and a fresh temporary --user-data-dir itself. No QUIC, no
# background fetches (the machines have no internet; they would only wait on timeouts).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000  # first paint of a page on 2 cores is a few seconds; a slow CI machine gets room
# The UI's settings, stored before the app reads them, as a user's clicks would leave them: the
# assistant panel closed (it covers a third of the page). The "Model training" side of the UI is
# not stored: a fresh profile opens an experiment on its GenAI pages, whatever the experiment's
# tags say, and the links Ratchet prints carry `?workflowType=machine_learning`, as `open` does.
UI_SETTINGS = ("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
               "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');")


def require_chromium() -> None:
    if not CHROMIUM.is_file():
        raise RuntimeError(f"{CHROMIUM} not found: the browser test drives Debian's headless Chromium, which "
                           "`make test` installs (its `chromium` step: apt-get install -y chromium)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def mlflow_server(db: Path, log: Path, timeout: float = 60) -> Iterator[str]:
    """`mlflow server` on a free loopback port over the SQLite store `db`; yields its base URL.
    Artifacts are read from each experiment's own artifact location. Stopped (its whole process
    group: uvicorn and the job runner are children) on exit, so nothing is left listening."""
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{Path(db).resolve()}",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=Path(db).parent, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n{Path(log).read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer on {base} in {timeout:.0f} s:\n"
                                   f"{Path(log).read_text()[-3000:]}")
            time.sleep(0.25)
        yield base
    finally:
        _stop(proc)
        if listening(port):
            raise RuntimeError(f"port {port} still listening after mlflow server stopped")


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; make sure its children (uvicorn, job runner) are too
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)


@contextmanager
def browser_page(width: int = 1400, height: int = 900):
    """A page of headless Chromium in a fresh profile (Playwright's temporary user-data-dir)."""
    from playwright.sync_api import expect, sync_playwright

    require_chromium()
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            context.add_init_script(UI_SETTINGS)
            context.set_default_timeout(TIMEOUT_MS)
            yield context.new_page()
        finally:
            browser.close()


class MlflowUI:
    """The pages of the MLflow UI that Ratchet's runs and registry show up on; each method opens
    one, waits until it shows what the caller read from the store, and screenshots it."""

    def __init__(self, page, base: str, shots: list[Path]):
        self.page, self.base, self.shots = page, base, [Path(d) for d in shots]
        for folder in self.shots:
            folder.mkdir(parents=True, exist_ok=True)

    def open(self, route: str) -> None:
        view = MODEL_TRAINING_VIEW if route.startswith("/experiments") else ""
        self.page.goto(f"{self.base}/#{route}{view}")

    def shot(self, name: str) -> list[Path]:
        time.sleep(0.5)  # charts animate in; the checks above have passed already
        paths = [folder / f"{name}.png" for folder in self.shots]
        for path in paths:
            self.page.screenshot(path=path)
        return paths

    def expect(self, locator):
        from playwright.sync_api import expect

        return expect(locator)

    def runs_list(self, experiment_id: str, run_name: str, shot: str = "experiment-runs") -> None:
        """The experiment page lists the run by its name (a link to the run)."""
        self.open(f"/experiments/{experiment_id}")
        self.expect(self.page.get_by_role("link", name=run_name, exact=True)).to_be_visible(timeout=TIMEOUT_MS)
        self.shot(shot)

    def run_params(self, experiment_id: str, run_id: str, run_name: str, params: dict[str, str],
                   shot: str = "run-params") -> None:
        """The run's overview names the run and lists each param with its value."""
        page = self.page
        self.open(f"/experiments/{experiment_id}/runs/{run_id}")
        self.expect(page.get_by_role("heading", name=run_name)).to_be_visible(timeout=TIMEOUT_MS)
        search = page.get_by_placeholder("Search parameters")
        for key, value in params.items():
            search.fill(key)
            row = page.get_by_role("row").filter(has=page.get_by_text(key, exact=True))
            self.expect(row).to_have_count(1, timeout=TIMEOUT_MS)
            self.expect(row).to_contain_text(value)
        search.fill(os.path.commonprefix(list(params)))  # the screenshot shows them together
        page.get_by_text(re.compile(r"^Parameters \(\d+\)$")).evaluate("e => e.scrollIntoView()")
        self.shot(shot)

    def metric_chart(self, experiment_id: str, run_id: str, metric: str, steps: int | None = None,
                     shot: str = "run-metric") -> None:
        """The run's model-metrics tab draws `metric` per step; with `steps`, one point each."""
        page = self.page
        self.open(f"/experiments/{experiment_id}/runs/{run_id}/model-metrics")
        page.get_by_placeholder("Search metric charts").fill(metric)
        card = page.locator('[data-testid="experiment-view-compare-runs-card"]').filter(
            has=page.get_by_text(metric, exact=True))
        self.expect(card).to_have_count(1, timeout=TIMEOUT_MS)
        self.expect(card.locator(".js-plotly-plot")).to_be_visible()
        if steps is not None:
            self.expect(card.locator(".scatterlayer path.point")).to_have_count(steps, timeout=TIMEOUT_MS)
        self.shot(shot)

    def artifact_image(self, experiment_id: str, run_id: str, path: str, width: int,
                       shot: str = "run-artifact") -> None:
        """The run's artifacts tab previews the PNG at `path` (decoded: its pixel width is `width`)."""
        page = self.page
        self.open(f"/experiments/{experiment_id}/runs/{run_id}/artifacts")
        for part in path.split("/"):
            page.get_by_text(part, exact=True).click()
        page.wait_for_function(
            "w => [...document.images].some(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth === w)",
            arg=width, timeout=TIMEOUT_MS)
        self.shot(shot)

    @staticmethod
    def alias_tags(within, alias: str):
        """The `@alias` tags the UI draws for aliases (not "@champion" as text in a description)."""
        return within.locator('[data-component-id*="modelversionaliastag"]').filter(
            has_text=re.compile(rf"^@\s*{re.escape(alias)}$"))

    def registered_model(self, name: str, version: str, alias: str, texts: list[str],
                         shot: str = "registered-model") -> None:
        """The registered model's page lists `version` with `@alias` and the start of each of `texts`
        (the page cuts a long description short; `model_version` checks them whole)."""
        page = self.page
        self.open(f"/models/{quote(name, safe='')}")
        row = page.get_by_role("row").filter(has=page.get_by_role("link", name=f"Version {version}", exact=True))
        self.expect(row).to_have_count(1, timeout=TIMEOUT_MS)
        self.expect(self.alias_tags(row, alias).first).to_be_visible()
        for text in texts:
            self.expect(row).to_contain_text(text[:24])
        self.shot(shot)

    def model_version(self, name: str, version: str, alias: str, texts: list[str],
                      shot: str = "model-version") -> None:
        """The version's page shows `@alias` and each of `texts` (tags, description)."""
        page = self.page
        self.open(f"/models/{quote(name, safe='')}/versions/{version}")
        self.expect(page.get_by_text(f"Version {version}", exact=True).first).to_be_visible(timeout=TIMEOUT_MS)
        self.expect(self.alias_tags(page, alias).first).to_be_visible()
        for text in texts:  # scrolled to, within the page and within its table
            shown = page.get_by_text(text, exact=True).first
            shown.scroll_into_view_if_needed(timeout=TIMEOUT_MS)
            self.expect(shown).to_be_in_viewport()
        self.shot(shot)


def check_champion(ui: MlflowUI, tracking_uri: str, model: str, alias: str = "champion", metric: str = "val_loss",
                   params: tuple[str, ...] = ("train.optimizer.lr", "train.epochs"), artifact: str = "plots/curves.png",
                   exact_steps: bool = True, prefix: str = "") -> dict:
    """Every page for the `@alias` version of `model` and the run that trained it, each checked
    against the store; returns what was expected."""
    from PIL import Image

    import mlflow

    client = mlflow.MlflowClient(tracking_uri, tracking_uri)
    version = client.get_model_version_by_alias(model, alias)
    run = client.get_run(version.run_id)
    experiment_id = run.info.experiment_id
    history = client.get_metric_history(run.info.run_id, metric)
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=artifact,
                                                tracking_uri=tracking_uri)
    with Image.open(local) as image:
        width = image.width
    reason = version.tags["ratchet.promotion.reason"]
    texts = [reason] + ([version.description] if version.description and version.description != reason else [])

    ui.runs_list(experiment_id, run.info.run_name, shot=f"{prefix}experiment-runs")
    ui.run_params(experiment_id, run.info.run_id, run.info.run_name, {key: run.data.params[key] for key in params},
                  shot=f"{prefix}run-params")
    ui.metric_chart(experiment_id, run.info.run_id, metric, len(history) if exact_steps else None,
                    shot=f"{prefix}run-metric-{metric}")
    ui.artifact_image(experiment_id, run.info.run_id, artifact, width, shot=f"{prefix}run-artifact")
    ui.registered_model(model, version.version, alias, texts, shot=f"{prefix}registered-model")
    ui.model_version(model, version.version, alias, texts, shot=f"{prefix}model-version")
    return {"run": run, "version": version, "steps": len(history), "reason": reason}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Screenshots of the MLflow UI over a project's store "
                                                 "(run after `make run`)")
    parser.add_argument("--root", type=Path, default=Path("."), help="project folder (mlflow.db, reports/)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder the PNGs are written to")
    parser.add_argument("--model", default="tabular", help="registered model whose @champion is shown")
    args = parser.parse_args(argv)

    db = (args.root / "mlflow.db").resolve()
    if not db.is_file():
        print(f"error: {db} not found: run `make run` first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, mlflow_server(db, Path(tmp) / "server.log") as base, \
            browser_page() as page:
        ui = MlflowUI(page, base, [args.out])
        seen = check_champion(ui, f"sqlite:///{db}", args.model, exact_steps=False, prefix="mlflow-")
    copied = []
    for pattern, name in (("reports/*/plots/confusion_matrix.png", "confusion-matrix.png"),
                          ("reports/*/plots/forecast.png", "forecast.png")):
        found = sorted(args.root.glob(pattern))
        if found:
            shutil.copyfile(found[0], args.out / name)
            copied.append(f"{found[0]} -> {args.out / name}")
    print(f"{args.model} v{seen['version'].version} @champion, run {seen['run'].info.run_name}: "
          f"screenshots in {args.out}/mlflow-*.png")
    for line in copied:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
