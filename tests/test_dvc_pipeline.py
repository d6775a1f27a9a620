"""The shipped dvc.yaml and params.yaml, as `make run` and `dvc repro` use them."""

from __future__ import annotations

import shutil

from conftest import REPO, dvc, git
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo

from ratchet.config import load_params

STEPS = ("prepare", "train", "evaluate", "promote")


def test_every_stage_parameter_is_written_in_params_yaml_and_every_pipeline_has_its_stages(tmp_path):
    # DVC needs each parameter a stage lists written in params.yaml (config defaults do not
    # count): a missing one fails `dvc repro` only when that stage runs, deep into `make run`.
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    git(tmp_path, "init", "-q")
    dvc(tmp_path, "init", "-q")
    stages = {stage.name: stage for stage in Repo(str(tmp_path)).index.stages}
    for stage in stages.values():
        for dep in stage.deps:
            if isinstance(dep, ParamsDependency):
                found = dep.read_params()
                assert [p for p in dep.params if p not in found] == [], stage.name
    for pipeline in load_params(tmp_path / "params.yaml").pipelines:
        for step in STEPS:
            stage = stages[f"{pipeline}_{step}"]
            assert stage.cmd == f"ratchet {step} {pipeline}"
