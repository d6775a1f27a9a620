"""The multihead family (two-level trees, several inputs and heads) and the duplicate guard that
every image-like family runs in prepare."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from conftest import load_prepared, make_group_tree, ratchet, tiny_params, write_params

from ratchet.config import load_params
from ratchet.errors import RatchetError
from ratchet.families import multihead
from ratchet.stages import evaluate, prepare, promote, train


def _copy_as_test_tree(project, tree: str, copies: int) -> None:
    """Split `tree` into <tree>/train and <tree>/test, the test tree holding fresh files plus
    `copies` byte-identical copies of training files under other names (as Omniglot's split)."""
    root = project / "data/raw" / tree
    staging = project / "data/raw" / f"{tree}_all"
    root.rename(staging)
    moved = 0
    for image in sorted(p for p in staging.rglob("*.png")):
        rel = image.relative_to(staging)
        test = rel.stem.endswith(("_00", "_01", "_0", "_1")) or rel.stem.startswith("img_000")
        (root / ("test" if test else "train") / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, root / ("test" if test else "train") / rel)
    for image in sorted((root / "train").rglob("*.png")):
        if moved == copies:
            break
        rel = image.relative_to(root / "train")
        shutil.copy(image, root / "test" / rel.parent / f"copy_of_{rel.name}")
        moved += 1
    shutil.rmtree(staging)


def test_a_test_file_identical_to_a_training_file_is_found_whatever_its_name(project):
    _copy_as_test_tree(project, "groups", copies=4)
    changes = {"multihead.data.source": "data/raw/groups", "multihead.data.train": "train",
               "multihead.data.test": "test"}
    write_params(project, tiny_params(**changes))
    failed = ratchet(project, "prepare", "multihead", check=False)
    assert failed.returncode == 2
    line = failed.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {project / 'data/raw/groups'}: 4 evaluation files (val 0, test 4) are "
                           "byte-identical to files of an earlier split, e.g. test/")
    assert "/copy_of_" in line and line.endswith("set data.duplicates: drop (score on the rest) or keep")
    assert not (project / "data/prepared/multihead").exists()

    total_test = len(list((project / "data/raw/groups/test").rglob("*.png")))
    write_params(project, tiny_params(**changes, **{"multihead.data.duplicates": "drop"}))
    dropped = ratchet(project, "prepare", "multihead")
    assert "warning: 4 files byte-identical to an earlier split's dropped from val (0) and test (4)" in dropped.stdout
    meta = load_prepared(project / "data/prepared/multihead").meta
    assert meta.rows["test"] == total_test - 4 and meta.duplicates["test"] == 4 and meta.duplicates["policy"] == "drop"
    assert not any("copy_of_" in str(i) for i in load_prepared(project / "data/prepared/multihead").array("test_ids"))

    write_params(project, tiny_params(**changes, **{"multihead.data.duplicates": "keep"}))
    kept = ratchet(project, "prepare", "multihead")
    assert "kept in (data.duplicates: keep)" in kept.stdout
    assert load_prepared(project / "data/prepared/multihead").meta.rows["test"] == total_test


def test_the_image_family_guards_its_splits_too_and_refuses_a_two_level_tree(project):
    # one tree split by the seed: a copy of an image lands in another split than the original
    for image in sorted((project / "data/raw/images").rglob("*.png"))[:12]:
        shutil.copy(image, image.with_name(f"again_{image.name}"))
    failed = ratchet(project, "prepare", "image", check=False)
    assert failed.returncode == 2 and "byte-identical to files of an earlier split" in failed.stderr
    assert failed.stderr.count("\n") == 1

    write_params(project, tiny_params(**{"image.data.source": "data/raw/groups"}))
    nested = ratchet(project, "prepare", "image", check=False)
    assert nested.returncode == 2
    assert nested.stderr == (f"error: {project / 'data/raw/groups/Alpha'}: class folder holds folders (character01, "
                             f"character02, character03); an image tree is {project / 'data/raw/groups'}/<class>/"
                             "<image> (for <group>/<class>/<image>, use family: multihead)\n")


def test_classes_are_group_and_folder_and_a_character_name_repeats_across_groups(project):
    meta = prepare.run(load_params(project / "params.yaml"), "multihead")
    assert meta.groups == ["Alpha", "Beta"]
    assert meta.classes == [f"{g}/character{c:02d}" for g in ("Alpha", "Beta") for c in (1, 2, 3)]
    assert meta.class_group == [0, 0, 0, 1, 1, 1]
    assert meta.duplicates == {"policy": "fail", "val": 0, "test": 0, "example": None}


@pytest.mark.parametrize(("change", "message"), [
    ({"multihead.model.inputs": ["image", "group"], "multihead.model.heads": {"group": 1.0, "class": 1.0}},
     "pipelines.multihead.model: heads: group is also an input"),
    ({"multihead.model.inputs": ["group"]}, "inputs: must include image"),
    ({"multihead.model.heads": {"class": 1.0}, "multihead.promote.metric": "group.accuracy"},
     "promote.metric: group.accuracy follows the group head, which model.heads does not have (heads: class)"),
    ({"multihead.model.heads": {"kind": 1.0}}, "pipelines.multihead.model.heads.kind"),
    ({"multihead.promote.metric": "f1_macro"}, "promote.metric: this family computes class.accuracy"),
])
def test_bad_inputs_heads_and_head_metrics_name_the_key(tmp_path, change, message):
    write_params(tmp_path, tiny_params(**change))
    with pytest.raises(RatchetError) as info:
        load_params(tmp_path / "params.yaml")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_monitor_and_gate_may_follow_a_head_the_network_has(tmp_path):
    write_params(tmp_path, tiny_params(**{"multihead.model.heads": {"class": 1.0}}))  # monitor val_class_accuracy
    assert load_params(tmp_path / "params.yaml").pipeline("multihead").train.monitor == "val_class_accuracy"


@pytest.mark.slow
def test_multi_input_net_metrics_and_reports_per_head_match_its_predictions(project, monkeypatch):
    """Image + group -> class; every figure in metrics.json agrees with predictions.csv, and a
    head with more classes than MATRIX_PNG_LIMIT gets a CSV matrix and its most confused pairs."""
    monkeypatch.setattr(multihead, "MATRIX_PNG_LIMIT", 4)
    params = tiny_params(**{"multihead.model.inputs": ["image", "group"], "multihead.model.heads": {"class": 1.0},
                            "multihead.train.epochs": 4})
    write_params(project, params)
    loaded = load_params(project / "params.yaml")
    for stage in (prepare, train):
        stage.run(loaded, "multihead")
    metrics = evaluate.run(loaded, "multihead")
    out = project / "reports/multihead/evaluation"
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["samples"] == load_prepared(project / "data/prepared/multihead").meta.rows["test"]
    right = sum(r["actual_class"] == r["predicted_class"] for r in rows)
    assert metrics["class.accuracy"] == pytest.approx(right / len(rows))
    assert all("/" in r["actual_class"] for r in rows)  # classes are group/character
    assert set(metrics["heads"]) == {"class"} and "group.accuracy" not in metrics
    per_class = json.loads((out / "classification_report_class.json").read_text())
    assert list(per_class)[0] == "Alpha/character01" and sum(r["support"] for r in per_class.values()) == len(rows)
    matrix = np.loadtxt(out / "confusion_matrix_class.csv", delimiter=",", skiprows=1)
    assert matrix.shape == (6, 6) and matrix.trace() == right
    report = (out / "classification_report_class.txt").read_text()
    assert "the 20 most confused pairs" in report and "same group" in report
    assert not (out / "confusion_matrix_class.png").exists()

    # Under two processes (uneven shards of 3-sample batches) each test sample is counted once.
    alone_predictions = (out / "predictions.csv").read_text()
    params["pipelines"]["multihead"]["evaluate"].update(nproc=2, batch_size=3)
    write_params(project, params)
    ratchet(project, "evaluate", "multihead")
    pair = json.loads((project / "reports/multihead/metrics.json").read_text())
    assert pair["samples"] == metrics["samples"]
    for key, value in metrics.items():
        if isinstance(value, float):
            assert pair[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    for name, row in metrics["heads"]["class"]["per_class"].items():
        assert pair["heads"]["class"]["per_class"][name] == pytest.approx(row), name
    assert (out / "predictions.csv").read_text() == alone_predictions

    result = promote.run(loaded, "multihead")
    assert result["promoted"] and result["score"] == pytest.approx(metrics["class.f1_macro"], rel=1e-4)


def test_two_level_tree_errors_name_the_folder(tmp_path):
    make_group_tree(tmp_path / "data/raw/groups", groups=("Solo",), per_group=1)
    write_params(tmp_path, tiny_params())
    proc = ratchet(tmp_path, "prepare", "multihead", check=False)
    assert proc.returncode == 2
    assert "one class (Solo/character01); a classifier needs at least two" in proc.stderr
    (tmp_path / "data/raw/groups/Solo/loose.png").write_bytes(b"")
    proc = ratchet(tmp_path, "prepare", "multihead", check=False)
    assert f"{tmp_path / 'data/raw/groups/Solo'}: holds files (loose.png, ...) beside its class folders" in proc.stderr


def test_the_loss_is_the_weighted_sum_of_each_heads_cross_entropy(project):
    import torch

    cfg = load_params(project / "params.yaml").pipeline("multihead")  # heads {group: 0.3, class: 1.0}
    meta = prepare.run(load_params(project / "params.yaml"), "multihead")
    loss, metrics = multihead.FAMILY.objective(cfg, meta, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    outputs = {"class": torch.randn(5, 6, generator=g), "group": torch.randn(5, 2, generator=g)}
    targets = {"class": torch.tensor([0, 1, 2, 3, 4]), "group": torch.tensor([0, 0, 0, 1, 1])}
    total, parts = loss(outputs, targets)
    ce = torch.nn.functional.cross_entropy
    assert parts["group"].item() == pytest.approx(ce(outputs["group"], targets["group"]).item())
    assert total.item() == pytest.approx(0.3 * parts["group"].item() + 1.0 * parts["class"].item())
    metrics.update(outputs, targets)
    assert set(metrics.compute()) == {"class", "group"}


def test_a_tree_one_level_too_deep_says_so(project):
    """A source holding train/ and test/ trees, with data.train and data.test left unset."""
    _copy_as_test_tree(project, "groups", copies=0)
    proc = ratchet(project, "prepare", "multihead", check=False)
    assert proc.returncode == 2
    assert proc.stderr == (f"error: {project / 'data/raw/groups/test/Alpha'}: holds folders (character01, character02, "
                           "character03), not images: the tree is one level deeper than expected (set data.train "
                           "and data.test to its subtrees?)\n")
