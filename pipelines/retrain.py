"""Retraining flow: prepare -> train -> evaluate -> promote for each pipeline in params.yaml.

    python -m pipelines.retrain                 # every pipeline (this is `make run`)
    python -m pipelines.retrain tabular         # only the named ones

Each task runs `dvc repro <step>@<pipeline>` (and first `dvc repro demo_data`): DVC decides
what is stale, runs the stage's command and records dvc.lock, so after the flow `dvc status`
is clean and `dvc repro` has nothing to do. The flow holds no ML logic.

The log heads each step with where the run is (`[pipeline 2/5 image] step 3/4 evaluate`) and
shows what the stage printed, less DVC's advice for a person at a prompt (`git add dvc.lock`,
autostage, `dvc push`). The summary at the end points at the MLflow UI: the tracking server's
pages when MLFLOW_TRACKING_URI is one, else `make ui`.

Retries: a stage that stopped with its own one-line error (bad params, data, a registry
mismatch: `error: ...`) fails the flow at once, since the same input fails the same way; a
training that crashed or was killed is retried (`--train-retries`) and resumes from the
checkpoint the failed attempt left. Without PREFECT_API_URL, Prefect starts a temporary local
server for the run; pipelines/deploy.py schedules this flow on a server.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from ratchet.config import load_params
from ratchet.errors import RatchetError
from ratchet.families import get_family
from ratchet.stages import STEPS, stage_name
from ratchet.tracking.lineage import FLOW_RUN_ENV

DEMO_STAGE = "demo_data"

# What `dvc repro` prints for a person at a prompt, the same after every stage. Committing
# dvc.lock and `dvc push` are left to a person after the run, so in the flow's log these lines
# only bury what the stages printed.
DVC_ADVICE = re.compile(
    r"(To track the changes with git, run:|git add \S.*|To enable auto staging, run:|dvc config core\.autostage true"
    r"|Use `dvc push` to send your updates to remote storage\.|(Generating|Updating) lock file '.*'"
    r"|Data and pipelines are up to date\.)"
)
SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")


class StageRefused(RuntimeError):
    """A stage stopped with its own one-line error: deterministic, never retried."""


def retry_can_fix(task, task_run, state) -> bool:
    """Prefect's retry condition: retry a crash or kill, not a stage's own refusal."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return not isinstance(exc, StageRefused)


@task(retry_condition_fn=retry_can_fix)
def dvc_repro(stage: str, root: str, label: str = "", force_because: str | None = None) -> None:
    """`dvc repro <stage>` in the project, its output streamed to the task log after `label`
    (which pipeline and step this is), less DVC's advice (`shown`). With `force_because` (why),
    the stage runs even though DVC finds it up to date (`--force --single-item`)."""
    logger = get_run_logger()
    if label:
        logger.info(label)
    force = ["--force", "--single-item"] if force_because else []
    if force_because:
        logger.info(f"{force_because}: running {stage} again")
    bin_dir = str(Path(sys.executable).parent)  # the stage commands (`ratchet ...`) live beside python
    env = {**os.environ, FLOW_RUN_ENV: str(flow_run.get_id() or ""),
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", *force, stage], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: deque[str] = deque(maxlen=200)
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            if shown(line, stage):
                logger.info(line)
            lines.append(line)  # every line: the failure message reads DVC's own too
    if proc.wait() != 0:
        refused = any(line.startswith("error: ") for line in lines)
        raise (StageRefused if refused else RuntimeError)(failure_message(stage, proc.returncode, list(lines)))


def shown(line: str, stage: str) -> bool:
    """Whether the log shows a line of `dvc repro <stage>`: not DVC's advice, and not the
    "didn't change, skipping" of the upstream stages the steps before have just run."""
    skipped = SKIPPED.fullmatch(line.strip())
    return not DVC_ADVICE.fullmatch(line.strip()) and (skipped is None or skipped.group(1) == stage)


def failure_message(stage: str, returncode: int, lines: list[str]) -> str:
    """One line for a failed `dvc repro <stage>`: the failing command's own `error: ...` line when
    it printed one (the cause: a file, column, key), else DVC's last error line."""
    own = [line[len("error: "):] for line in lines if line.startswith("error: ")]
    if own:
        failed = re.findall(r"failed to reproduce '([^']+)'", "\n".join(lines))
        return f"{failed[-1] if failed else stage}: {own[-1]}"
    errors = [line for line in lines if "error" in line.lower()] or lines
    return f"dvc repro {stage} failed (exit {returncode}): {errors[-1] if errors else ''}"


@flow(name="ratchet-pipeline", flow_run_name="{pipeline}")
def pipeline_flow(pipeline: str, params_file: str = "params.yaml", train_retries: int = 2,
                  number: int = 1, of: int = 1) -> dict:
    """One pipeline's stages in order (it is pipeline `number` of `of` in the run); returns its
    promotion record."""
    params = load_params(params_file)
    cfg = params.pipeline(pipeline)
    for step in STEPS:
        retries = train_retries if step == "train" else 0
        dvc_repro.with_options(name=f"{pipeline}-{step}", retries=retries, retry_delay_seconds=5)(
            stage_name(step, pipeline), str(params.root), step_label(pipeline, number, of, step),
            untracked(cfg, params.root, pipeline) if step == "train" else None,
        )
    return json.loads(cfg.promote.out.read_text())


def untracked(cfg, root: Path, pipeline: str) -> str | None:
    """Why the trained model must be trained again although DVC finds it up to date: its MLflow
    run (or registered version) is not in the tracking store in use. DVC sees data, params and
    code, not where MLFLOW_TRACKING_URI points: after a switch to a team server (or a deleted
    mlflow.db) the model would stay registered only in the old store. None when it is there, or
    when nothing was trained yet."""
    from ratchet.tracking.runs import RUN_FILE, tracked_run

    if not (cfg.train.out_dir / RUN_FILE).is_file():
        return None
    try:
        tracked_run(cfg.train.out_dir, root, stage_name("train", pipeline))
    except RatchetError as exc:
        return str(exc).split("; train again")[0]
    return None


def step_label(pipeline: str, number: int, of: int, step: str) -> str:
    """The log's heading for a step: `[pipeline 2/5 image] step 3/4 evaluate`."""
    return f"[pipeline {number}/{of} {pipeline}] step {STEPS.index(step) + 1}/{len(STEPS)} {step}"


@flow(name="ratchet-retrain")
def retrain(pipelines: list[str] | None = None, params_file: str = "params.yaml", train_retries: int = 2) -> dict:
    """The demo-data stage, then every named pipeline (default: all in params.yaml) in turn."""
    params = load_params(params_file)
    stages = (yaml.safe_load((params.root / "dvc.yaml").read_text()) or {}).get("stages", {})
    names = pipelines or list(params.pipelines)
    with project_lock(params.root, get_run_logger()):
        if DEMO_STAGE in stages:  # upstream of no pipeline once they all read your own data
            label = f"[{DEMO_STAGE}] the built-in datasets, before the {len(names)} pipelines"
            dvc_repro.with_options(name=DEMO_STAGE)(DEMO_STAGE, str(params.root), label)
        return {name: pipeline_flow(name, params_file, train_retries, number, len(names))
                for number, name in enumerate(names, 1)}


LOCK_FILE = "ratchet-flow.lock"  # in .dvc/tmp, beside DVC's own lock (git-ignored there)


@contextlib.contextmanager
def project_lock(root: Path, logger, poll_s: float = 1.0, report_s: float = 60.0):
    """Hold the project for one flow run at a time: a second run (a schedule firing while
    someone runs `make run`, or Prefect starting a scheduled run twice) waits here until the
    first ends, then finds what the first did up to date. DVC's own lock would instead fail the
    second `dvc repro` at once ("Unable to acquire lock"). The OS releases the lock when its
    holder dies, so a killed run never leaves the project locked."""
    folder = root / ".dvc" / "tmp" if (root / ".dvc").is_dir() else root
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as handle:
        waited = 0.0
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if waited % report_s < poll_s:
                    handle.seek(0)
                    holder = handle.read().strip() or "another flow run"
                    logger.info(f"waiting for {holder} to finish in {root} ({waited:.0f} s so far)")
                time.sleep(poll_s)
                waited += poll_s
        handle.seek(0)
        handle.truncate()
        handle.write(f"flow run {flow_run.get_id() or '?'} (pid {os.getpid()})")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


# MLflow 3's UI shows an experiment on its GenAI pages (traces, sessions) unless the browser has
# chosen "Model training" or the link says so; the experiment's kind tag alone does not switch it.
MODEL_TRAINING_VIEW = "?workflowType=machine_learning"


def mlflow_ui(tracking_uri: str | None) -> str | None:
    """The address of the tracking server's UI when MLFLOW_TRACKING_URI is one (http or https);
    None for a local store (the project's mlflow.db), which `make ui` serves."""
    if tracking_uri and tracking_uri.split("://")[0].lower() in ("http", "https"):
        return tracking_uri.rstrip("/")
    return None


def summary(results: dict, params_file: str, tracking_uri: str | None = None) -> str:
    """Where to look after a run; the MLflow pages are on the server `tracking_uri` names, or
    behind `make ui`."""
    params = load_params(params_file)
    ui = mlflow_ui(tracking_uri)
    rel = lambda p: os.path.relpath(p, params.root)  # noqa: E731
    lines = ["", "Done."]
    for name, promo in results.items():
        cfg = params.pipeline(name)
        metrics = json.loads(cfg.evaluate.metrics.read_text())
        run = json.loads((cfg.train.out_dir / "run.json").read_text())
        report = ", ".join(sorted(p.name for p in cfg.evaluate.out_dir.iterdir() if p.suffix in (".txt", ".png")))
        lines += [
            f"{name}: test {get_family(cfg.family).summary(metrics)}; "
            f"{promo['registered_model']} v{promo['version']} "
            + ("promoted" if promo["promoted"] else "stays @champion" if promo["champion_after"] == promo["version"]
               else "not promoted") + f": {promo['reason']}",
            f"  champion      models:/{promo['registered_model']}@champion (v{promo['champion_after']})"
            + (f"   {ui}/#/models/{promo['registered_model']}" if ui else ""),
            f"  metrics       {rel(cfg.evaluate.metrics)}   (dvc metrics show)",
            f"  report        {rel(cfg.evaluate.out_dir)}/{report}",
            f"  model         {rel(cfg.train.out_dir)}/model.pt, per-epoch history.csv (dvc plots show)",
            f"  MLflow run    {run['run_id']} in experiment '{run['experiment']}': "
            + f"{ui or 'make ui -> http://127.0.0.1:5000'}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}"
            + MODEL_TRAINING_VIEW,
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pipelines", nargs="*", help="pipelines to run (default: all in params.yaml)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--train-retries", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        for name in args.pipelines:  # fail fast on bad params, before a server starts
            load_params(args.params).pipeline(name)
        load_params(args.params)
        results = retrain(args.pipelines or None, args.params, args.train_retries)
    except RatchetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a stage failed; its own error is in the log above
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary(results, args.params, os.environ.get("MLFLOW_TRACKING_URI")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
