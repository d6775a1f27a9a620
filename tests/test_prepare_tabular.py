"""Tabular prepare: deterministic stratified split, train-only statistics, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import load_prepared, ratchet, runs_by_status, tiny_params, write_params

from ratchet.config import load_params
from ratchet.data.tabular import prepare
from ratchet.errors import RatchetError
from ratchet.models.serving import TabularPreprocess


def run_prepare(project, **overrides):
    write_params(project, tiny_params(**overrides))
    cfg = load_params(project / "params.yaml").pipeline("tabular")
    prepare(cfg, project)
    return load_prepared(cfg.prepare.out_dir)


def arrays(prepared) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p) for p in sorted(prepared.dir.glob("*.npy"))}


def test_split_is_deterministic_for_a_seed_and_changes_with_it(project):
    first = arrays(run_prepare(project))
    again = arrays(run_prepare(project))
    assert first.keys() == again.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    other = arrays(run_prepare(project, **{"tabular.seed": 8}))
    assert not np.array_equal(first["test_ids"], other["test_ids"])


def test_splits_partition_the_rows_and_keep_class_proportions(project):
    prepared = run_prepare(project)
    rows = {s: prepared.array(f"{s}_ids") for s in ("train", "val", "test")}
    everything = np.concatenate(list(rows.values()))
    assert len(everything) == len(set(everything.tolist())) == 300
    labels = pd.read_csv(project / "data/raw/table.csv")["label"]
    overall = labels.value_counts(normalize=True)
    for split, idx in rows.items():
        share = labels.iloc[idx].value_counts(normalize=True)
        assert (share - overall).abs().max() < 0.06, split
    assert prepared.meta.rows == {"train": 210, "val": 45, "test": 45}


def test_statistics_come_from_the_training_split_only(project):
    prepared = run_prepare(project)
    raw = pd.read_csv(project / "data/raw/table.csv").drop(columns="label").to_numpy(np.float32)
    train_raw = raw[prepared.array("train_ids")]
    fill = np.nanmedian(train_raw, axis=0)
    filled = np.where(np.isnan(train_raw), fill, train_raw)
    np.testing.assert_allclose(prepared.meta.fill, fill, rtol=1e-6)
    np.testing.assert_allclose(prepared.meta.mean, filled.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(prepared.meta.std, filled.std(axis=0), rtol=1e-5)
    # Standardised training features have mean 0 / std 1; val and test are not forced to.
    np.testing.assert_allclose(prepared.array("train_x").mean(axis=0), 0, atol=1e-5)


def test_changing_val_and_test_rows_leaves_training_data_untouched(project):
    before = arrays(run_prepare(project))
    meta_before = json.loads((project / "data/prepared/tabular/meta.json").read_text())
    df = pd.read_csv(project / "data/raw/table.csv")
    held_out = np.concatenate([before["val_ids"], before["test_ids"]])
    df.loc[held_out, "f0"] = 1e6  # extreme values that would shift any statistic they leaked into
    df.loc[held_out, "f1"] = np.nan
    df.to_csv(project / "data/raw/table.csv", index=False)
    after = arrays(run_prepare(project))
    meta_after = json.loads((project / "data/prepared/tabular/meta.json").read_text())
    np.testing.assert_array_equal(before["train_x"], after["train_x"])
    for key in ("fill", "mean", "std"):
        assert meta_before[key] == meta_after[key]
    assert not np.array_equal(before["test_x"], after["test_x"])


def test_served_preprocessing_reproduces_the_prepared_test_features(project):
    prepared = run_prepare(project)
    meta = prepared.meta
    pre = TabularPreprocess(meta.fill, meta.mean, meta.std)
    raw = torch.from_numpy(np.array(prepared.array("test_x_raw")))
    assert torch.isnan(raw).any()  # the gate sees the raw rows, missing values included
    np.testing.assert_allclose(pre(raw).numpy(), prepared.array("test_x"), rtol=1e-5, atol=1e-6)


def test_impute_drop_removes_incomplete_rows_and_mean_differs_from_median(project):
    dropped = run_prepare(project, **{"tabular.prepare.impute": "drop"})
    df = pd.read_csv(project / "data/raw/table.csv")
    assert sum(dropped.meta.rows.values()) == int((~df.isna().any(axis=1)).sum())
    assert not np.isnan(dropped.array("test_x_raw")).any()
    mean = run_prepare(project, **{"tabular.prepare.impute": "mean"}).meta.fill
    median = run_prepare(project, **{"tabular.prepare.impute": "median"}).meta.fill
    assert mean != median


def test_string_and_numeric_labels_give_ordered_class_names(project):
    assert run_prepare(project).meta.classes == ["class_0", "class_1", "class_2"]
    df = pd.read_csv(project / "data/raw/table.csv")
    df["label"] = df["label"].str[-1].astype(int) * 5  # 0, 5, 10: numeric order, not text order
    df.to_csv(project / "data/raw/table.csv", index=False)
    assert run_prepare(project).meta.classes == ["0", "5", "10"]


def _set_cell(path, row, column, value):
    df = pd.read_csv(path)
    df[column] = df[column].astype(object)
    df.loc[row, column] = value
    df.to_csv(path, index=False)


BAD_INPUTS = {
    "missing file": (lambda p: p.unlink(), "table.csv: file not found"),
    "empty file": (lambda p: p.write_text(""), "table.csv: file is empty"),
    "header only": (lambda p: p.write_text("f0,f1,label\n"), "table.csv: has a header but no data rows"),
    "missing label column": (
        lambda p: pd.read_csv(p).rename(columns={"label": "target"}).to_csv(p, index=False),
        "table.csv: column 'label' not found (columns: f0, f1, f2, f3, f4, f5, target)",
    ),
    "non-numeric feature": (
        lambda p: _set_cell(p, row=4, column="f3", value="high"),
        "table.csv: column 'f3' is not numeric (line 6: 'high')",
    ),
    "single class": (
        lambda p: pd.read_csv(p).assign(label="class_0").to_csv(p, index=False),
        "table.csv: label column 'label' has a single class ('class_0'); need at least two",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_csv_fails_with_one_clear_line_and_no_outputs(project, case):
    breaks, expected = BAD_INPUTS[case]
    csv = project / "data/raw/table.csv"
    breaks(csv)
    proc = ratchet(project, "prepare", "tabular", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith(expected), proc.stderr
    assert str(csv) in lines[0]
    assert not (project / "data/prepared").exists() or not any((project / "data/prepared").iterdir())
    assert runs_by_status(project).get("RUNNING", 0) == 0


def test_failed_prepare_keeps_the_previous_prepared_data_intact(project):
    good = arrays(run_prepare(project))
    (project / "data/raw/table.csv").write_text("")
    with pytest.raises(RatchetError):
        run_prepare(project)
    still = arrays(load_prepared(project / "data/prepared/tabular"))
    assert good.keys() == still.keys()
    assert sorted(p.name for p in (project / "data/prepared").iterdir()) == ["tabular"]  # no temp dirs left


def test_class_too_small_to_split(project):
    df = pd.read_csv(project / "data/raw/table.csv")
    df.loc[:1, "label"] = "rare"
    df.to_csv(project / "data/raw/table.csv", index=False)
    with pytest.raises(RatchetError, match=r"class 'rare' has 2 sample\(s\); a split into train, test, val needs at least 3"):
        run_prepare(project)


def test_real_demo_table_prepares(tmp_path):
    from ratchet.data.demo import write_demo

    write_demo(tmp_path / "demo")
    csv = tmp_path / "demo/breast_cancer.csv"  # scikit-learn's real breast-cancer table
    run = run_prepare(tmp_path, **{"tabular.data.source": str(csv), "tabular.data.label": "diagnosis"})
    assert run.meta.classes == ["benign", "malignant"]
    assert sum(run.meta.rows.values()) == 569
    assert len(run.meta.features) == 30


def test_meta_records_paths_as_params_yaml_writes_them():
    """Inside the project or beside it: relative (the same in every checkout folder); on another
    mount, sharing only the filesystem root: absolute, as a relative path there means nothing."""
    from pathlib import Path

    from ratchet.data.prepared import project_path

    root = Path("/home/ana/project")
    assert project_path(root / "data/raw/table.csv", root) == "data/raw/table.csv"
    assert project_path(Path("/home/ana/shared/data/water.csv"), root) == "../shared/data/water.csv"
    assert project_path(Path("/mnt/lake/water.csv"), root) == "/mnt/lake/water.csv"
