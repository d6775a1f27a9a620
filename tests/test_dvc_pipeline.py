"""The shipped dvc.yaml and params.yaml, as `make run` and `dvc repro` use them."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import yaml
from conftest import REPO, dvc, git, ratchet
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo

from ratchet.config import load_params
from ratchet.families import FAMILIES
from ratchet.stages import STEPS, stage_name

PACKAGE = REPO / "src"


def _project(tmp_path: Path, params: dict | None = None) -> Path:
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, tmp_path / name)
    if params is not None:
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(PACKAGE, tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    git(tmp_path, "init", "-q")
    dvc(tmp_path, "init", "-q")
    return tmp_path


def _stages(project: Path) -> dict:
    return {stage.name: stage for stage in Repo(str(project)).index.stages}


def test_every_stage_parameter_is_written_in_params_yaml_and_every_pipeline_has_its_stages(tmp_path):
    # DVC needs each parameter a stage lists written in params.yaml (config defaults do not
    # count): a missing one fails `dvc repro` only when that stage runs, deep into `make run`.
    stages = _stages(_project(tmp_path))
    for stage in stages.values():
        for dep in stage.deps:
            if isinstance(dep, ParamsDependency):
                found = dep.read_params()
                assert [p for p in dep.params if p not in found] == [], stage.name
    for pipeline in load_params(tmp_path / "params.yaml").pipelines:
        for step in STEPS:
            assert stages[stage_name(step, pipeline)].cmd == f"ratchet {step} {pipeline}"


def test_a_pipeline_added_to_params_yaml_gets_its_stages_with_no_other_edit(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    water = json.loads(json.dumps(params["pipelines"]["tabular"]).replace("tabular", "water"))
    water["data"].update(source="data/water.csv", label="Potability")
    params["pipelines"]["water"] = water
    stages = _stages(_project(tmp_path, params))
    train = stages["train@water"]
    assert train.cmd == "ratchet train water"
    assert {str(Path(d.def_path)) for d in stages["prepare@water"].deps} >= {"data/water.csv"}
    assert [o.def_path for o in train.outs] == ["models/water"]
    assert "pipelines.water.train" in next(d for d in train.deps if isinstance(d, ParamsDependency)).params


def _module_file(name: str) -> Path | None:
    base = PACKAGE.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _reachable(start: list[str]) -> set[Path]:
    """Every file of the package that the modules `start` can import, following imports anywhere
    in a module (function bodies too: stages and family hooks import lazily) and the family
    registry's module names (imported by name at run time)."""
    seen: set[Path] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            path = _module_file(".".join(parts[:i]))
            if path is None or path in seen:
                continue
            seen.add(path)
            module = ".".join(parts[:i])
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    todo += [a.name for a in node.names if a.name.startswith("ratchet")]
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ratchet"):
                    todo += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            if module == "ratchet.families":
                todo += list(FAMILIES.values())
    return seen


def test_each_stage_depends_on_every_module_it_can_import(tmp_path):
    """dvc.yaml's code deps cover the stage's imports: change any code a stage runs and DVC
    calls the stage stale (a hand-kept list once missed evaluate/metrics.py, the loss)."""
    stages = _stages(_project(tmp_path))
    for pipeline in load_params(tmp_path / "params.yaml").pipelines:
        for step in STEPS:
            deps = [Path(d.def_path) for d in stages[stage_name(step, pipeline)].deps
                    if not isinstance(d, ParamsDependency)]
            reached = _reachable(["ratchet.__main__", "ratchet.cli", f"ratchet.stages.{step}"])
            assert len(reached) > 20  # the walk found the package, not nothing
            missing = [str(p.relative_to(REPO)) for p in sorted(reached)
                       if not any(p.relative_to(REPO).is_relative_to(dep) for dep in deps)]
            assert missing == [], f"{stage_name(step, pipeline)} imports modules its deps miss"


def test_editing_the_loss_code_makes_the_train_stage_stale(dvc_project):
    """With dvc.lock recording the current code, an edit of the classifiers' loss makes
    `dvc status` name train@tabular; an edit of promote's code does not touch it."""
    ratchet(dvc_project, "prepare", "tabular")
    (dvc_project / "models/tabular").mkdir(parents=True)
    (dvc_project / "models/tabular/model.pt").write_text("stands in for a trained model")
    dvc(dvc_project, "commit", "-f", "-q", "prepare@tabular", "train@tabular")
    assert json.loads(dvc(dvc_project, "status", "--json", "train@tabular").stdout) == {}

    promote_code = dvc_project / "src/ratchet/stages/promote.py"
    promote_code.write_text(promote_code.read_text() + "\n# an edit of the gate's code\n")
    assert json.loads(dvc(dvc_project, "status", "--json", "train@tabular").stdout) == {}

    loss_code = dvc_project / "src/ratchet/families/classification.py"
    text = loss_code.read_text()
    assert "nn.CrossEntropyLoss(weight=weight)" in text
    loss_code.write_text(text.replace("nn.CrossEntropyLoss(weight=weight)",
                                      "nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)", 1))
    status = json.loads(dvc(dvc_project, "status", "--json", "train@tabular").stdout)
    assert list(status) == ["train@tabular"]
    changed = [entry for entry in status["train@tabular"] if "changed deps" in entry][0]["changed deps"]
    assert changed == {"src/ratchet/families": "modified"}
