"""The promotion gate scores in a worker process (ratchet.tracking.scorer), which imports torch
and its pt2 loader while the stage's own process reads the registry: the scores are those the
family computes in one process, the worker's failures are the stage's (one line, or a failure
a retry may fix), it ends with the stage, and the stage's own process loads no pt2 program."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest
from conftest import PATIENCE, mlflow_client, ratchet, tiny_params, write_params

from ratchet.config import load_params
from ratchet.errors import RatchetError, StageFailed
from ratchet.families import get_family
from ratchet.serve.pt2 import load_program
from ratchet.tracking.registry import served_program
from ratchet.tracking.runs import use_tracking
from ratchet.tracking.scorer import Scorer


def trained(project):
    """The tabular pipeline prepared and trained (version 1 registered, not yet promoted)."""
    write_params(project, tiny_params(**{"tabular.train.epochs": 2}))
    for step in ("prepare", "train"):
        ratchet(project, step, "tabular")
    use_tracking(project)  # the registry that served_program reads
    return load_params(project / "params.yaml")


def test_the_scoring_process_scores_as_the_family_does_in_one_process(project, tmp_path):
    params = trained(project)
    cfg = params.pipeline("tabular")
    program = served_program(mlflow_client(project), "tabular", "1", tmp_path)
    family = get_family("tabular")
    prepared = family.load(cfg.prepare.out_dir)
    x, y = family.gate_data(cfg, prepared)
    keep = np.flatnonzero(np.asarray(y) != 0)  # a subset the metric tells apart from the whole
    model = load_program(program, "v1")
    expected = {"all": family.score(cfg, model, prepared.meta, x, y, "f1_macro"),
                "kept": family.score(cfg, model, prepared.meta, x[keep], y[keep], "f1_macro"),
                "accuracy": family.score(cfg, model, prepared.meta, x, y, "accuracy")}
    with Scorer(params.numerics, cfg) as scorer:
        assert scorer.pid is None  # this process has imported torch: it scores itself
    for process in (True, False):  # a worker process, or this one
        with Scorer(params.numerics, cfg, process=process) as scorer:
            got = {"all": scorer.score(program, "v1", None, "f1_macro"),
                   "kept": scorer.score(program, "v1", keep, "f1_macro"),
                   "accuracy": scorer.score(program, "v1", None, "accuracy")}
        assert (scorer.pid is not None) == process
        assert got == expected
        assert got["kept"] != got["all"]


def test_a_program_that_does_not_load_is_one_line_and_the_process_scores_on(project, tmp_path):
    params = trained(project)
    cfg = params.pipeline("tabular")
    program = served_program(mlflow_client(project), "tabular", "1", tmp_path / "good")
    broken = tmp_path / "model.pt2"
    broken.write_bytes(b"not an archive")
    with Scorer(params.numerics, cfg, process=True) as scorer:
        with pytest.raises(RatchetError) as info:
            scorer.score(broken, "registered model 'tabular' v9", None, "f1_macro")
        assert str(info.value).startswith("registered model 'tabular' v9: model.pt2 does not load (")
        assert "\n" not in str(info.value) and type(info.value) is RatchetError  # not retried
        assert 0 < scorer.score(program, "v1", None, "f1_macro") <= 1
        with pytest.raises(RuntimeError, match=r"(?s)^scoring v1 failed in the scoring process:\n.*IndexError"):
            scorer.score(program, "v1", np.array([10**6]), "f1_macro")  # a bug, not bad input: its traceback
        assert 0 < scorer.score(program, "v1", None, "f1_macro") <= 1


def test_a_scoring_process_that_dies_is_a_failure_a_retry_may_fix(project, tmp_path):
    params = trained(project)
    cfg = params.pipeline("tabular")
    program = served_program(mlflow_client(project), "tabular", "1", tmp_path)
    with Scorer(params.numerics, cfg, process=True) as scorer:  # dead before it is asked
        os.kill(scorer.pid, signal.SIGKILL)  # what the kernel's OOM killer does
        scorer._proc.wait()
        with pytest.raises(StageFailed, match=r"^scoring v1: the scoring process killed by signal 9 "):
            scorer.score(program, "v1", None, "f1_macro")
    stuck = tmp_path / "stuck.pt2"
    os.mkfifo(stuck)  # opening it for reading waits for a writer: the worker is mid-request when killed
    with Scorer(params.numerics, cfg, process=True) as scorer:
        threading.Timer(3, os.kill, (scorer.pid, signal.SIGKILL)).start()
        with pytest.raises(StageFailed, match=r"^scoring v2: the scoring process killed by signal 9 "):
            scorer.score(stuck, "v2", None, "f1_macro")


def test_the_scoring_process_ends_with_the_stage(project):
    params = trained(project)
    cfg = params.pipeline("tabular")
    with Scorer(params.numerics, cfg, process=True) as scorer:
        pass
    assert scorer._proc.returncode == 0  # it read the end of its input and exited
    with pytest.raises(KeyboardInterrupt), Scorer(params.numerics, cfg, process=True) as scorer:
        raise KeyboardInterrupt  # Ctrl-C while it still imports torch: not waited for
    assert scorer._proc.returncode == -signal.SIGKILL


def test_a_registered_program_torch_cannot_load_fails_the_stage_in_one_line_and_writes_nothing(project):
    trained(project)
    [program] = project.glob("mlartifacts/**/model.pt2") or project.glob("mlruns/**/model.pt2")
    with zipfile.ZipFile(program) as archive:  # the graph left out: MLflow's pickle check passes it
        records = {i.filename: archive.read(i) for i in archive.infolist() if not i.filename.endswith("model.json")}
    with zipfile.ZipFile(program, "w") as archive:
        for name, data in records.items():
            archive.writestr(name, data)
    proc = ratchet(project, "promote", "tabular", check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: registered model 'tabular' v1: model.pt2 does not load (")
    assert proc.stderr.count("\n") == 1
    assert not (project / "reports/tabular/promotion.json").exists()
    assert [m.name for m in mlflow_client(project).search_registered_models()] == ["tabular"]  # the lock is gone


TWO_CPUS = pytest.mark.skipif((os.cpu_count() or 1) < 2 or not shutil.which("taskset"),
                              reason="needs 2 CPUs and taskset")


@TWO_CPUS
def test_the_stage_process_loads_no_pt2_program_the_scoring_process_does_given_two_cpus(project):
    """With 2 CPUs the loader is imported in the scoring process only; on one (here pinned to CPU
    0, as a container limited to one CPU) the stage scores in its own process, with the same result."""
    trained(project)
    code = ("import json, sys\nfrom ratchet.cli import main\n"
            f"code = main(['promote', 'tabular', '--params', {str(project / 'params.yaml')!r}])\n"
            "print(json.dumps([code, [m for m in ('torch._dynamo', 'torch.export.pt2_archive._package', 'sympy')"
            " if m in sys.modules]]))")
    results = {}
    for cpus in ("0,1", "0"):
        proc = subprocess.run(["taskset", "-c", cpus, sys.executable, "-c", code], cwd=project, capture_output=True,
                              text=True, timeout=PATIENCE)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[cpus] = json.loads(proc.stdout.strip().splitlines()[-1])
        promotion = json.loads((project / "reports/tabular/promotion.json").read_text())
        results[cpus].append(promotion["score"])
    assert results["0,1"][:2] == [0, []]
    assert results["0"][:2] == [0, ["torch._dynamo", "torch.export.pt2_archive._package", "sympy"]]
    assert results["0"][2] == results["0,1"][2]  # re-run: v1 is @champion already, scored again alike


@TWO_CPUS
def test_usable_cpus_are_the_affinity_of_the_process():
    code = "from ratchet.tracking.scorer import usable_cpus; print(usable_cpus())"
    for cpus, expected in (("0", "1.0"), ("0,1", "2.0")):
        out = subprocess.run(["taskset", "-c", cpus, sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=PATIENCE)
        assert out.stdout.strip() == expected, out.stderr[-3000:]
