"""Data as users bring it: separate test and validation files, CSVs without a header row, other
separators, repeated column names, non-finite values, calendar frequencies, 16-bit images,
imbalanced classes (loss weights and a balanced sampler)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import dvc, load_prepared, make_csv, ratchet, tiny_params, write_params
from PIL import Image

from ratchet.config import load_params
from ratchet.errors import RatchetError
from ratchet.families import get_family
from ratchet.train.distributed import DistInfo
from ratchet.train.loader import BatchLoader, WeightedDistributedSampler


def _prepare(project, pipeline="tabular", **overrides):
    write_params(project, tiny_params(**overrides))
    cfg = load_params(project / "params.yaml").pipeline(pipeline)
    get_family(cfg.family).prepare(cfg, project)
    return cfg, load_prepared(cfg.prepare.out_dir)


def _two_files(project, test_rows=90):
    """table.csv split by hand into a training file and a later test file, as a course ships them."""
    table = pd.read_csv(project / "data/raw/table.csv")
    folder = project / "data/raw/split"
    folder.mkdir()
    table.iloc[:-test_rows].to_csv(folder / "train.csv", index=False)
    table.iloc[-test_rows:].to_csv(folder / "test.csv", index=False)
    return table, {"tabular.data.source": "data/raw/split", "tabular.data.train": "train.csv",
                   "tabular.data.test": "test.csv"}


# -- tabular: separate files -------------------------------------------------------------------

def test_a_separate_test_file_is_the_test_split_and_statistics_come_from_training_rows(project):
    table, files = _two_files(project)
    _, prepared = _prepare(project, **files)
    meta = prepared.meta
    assert meta.rows == {"train": 179, "val": 31, "test": 90}  # val: 15% of the training file, stratified
    features = table.drop(columns="label")
    np.testing.assert_array_equal(prepared.array("test_x_raw"), features.iloc[-90:].to_numpy(np.float32))
    np.testing.assert_array_equal(prepared.array("test_ids"), np.arange(90))  # rows of test.csv
    assert [meta.classes[i] for i in prepared.array("test_y")] == table["label"].iloc[-90:].tolist()
    train_rows = features.iloc[:-90].to_numpy(np.float32)[prepared.array("train_ids")]
    np.testing.assert_allclose(meta.fill, np.nanmedian(train_rows, axis=0), rtol=1e-6)
    assert meta.files == {"train": "data/raw/split/train.csv", "val": "data/raw/split/train.csv",
                          "test": "data/raw/split/test.csv"}

    # a validation file too: the training file is then all training rows
    table.iloc[:60].to_csv(project / "data/raw/split/val.csv", index=False)
    _, prepared = _prepare(project, **files, **{"tabular.data.val": "val.csv"})
    assert prepared.meta.rows == {"train": 210, "val": 60, "test": 90}


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.drop(columns="f2"), r"split/test.csv: column 'f2' of train.csv is missing \(1 missing in all\)"),
    (lambda t: t.assign(extra=1.0), r"split/test.csv: column 'extra' is not in train.csv"),
    (lambda t: t.assign(label="class_9"),
     r"split/test.csv: line 2: label 'class_9' is not a class of the training file train.csv "
     r"\(classes: class_0, class_1, class_2\)"),
])
def test_a_test_file_must_have_the_training_files_columns_and_classes(project, edit, message):
    _, files = _two_files(project)
    path = project / "data/raw/split/test.csv"
    edit(pd.read_csv(path)).to_csv(path, index=False)
    with pytest.raises(RatchetError, match=message):
        _prepare(project, **files)


def test_separate_files_live_under_the_source_folder_dvc_tracks(project):
    write_params(project, tiny_params(**{"tabular.data.test": "test.csv"}))
    with pytest.raises(RatchetError, match=r"pipelines.tabular.data: test: separate files need data.train as well: "
                                           r"data.source is then the folder holding them"):
        load_params(project / "params.yaml")
    write_params(project, tiny_params(**{"tabular.data.train": "a.csv", "tabular.data.test": "../b.csv"}))
    with pytest.raises(RatchetError, match=r"test: '../b.csv' must be a path under data.source"):
        load_params(project / "params.yaml")


def test_editing_a_separate_test_file_makes_prepare_stale(dvc_project):
    _, files = _two_files(dvc_project)
    write_params(dvc_project, tiny_params(**files))
    ratchet(dvc_project, "prepare", "tabular")
    dvc(dvc_project, "commit", "-f", "-q", "prepare@tabular")
    assert json.loads(dvc(dvc_project, "status", "--json", "prepare@tabular").stdout) == {}
    test = dvc_project / "data/raw/split/test.csv"
    test.write_text(test.read_text().replace("class_1", "class_2", 1))
    status = json.loads(dvc(dvc_project, "status", "--json", "prepare@tabular").stdout)
    changed = [entry for entry in status["prepare@tabular"] if "changed deps" in entry][0]["changed deps"]
    assert changed == {"data/raw/split": "modified"}


# -- CSV format: header, separator, column names, values -------------------------------------

def test_a_csv_without_a_header_row_is_refused_and_read_with_data_columns(project):
    table = pd.read_csv(project / "data/raw/table.csv")
    table.to_csv(project / "data/raw/words.csv", index=False, header=False)  # a label of words in the first row
    with pytest.raises(RatchetError, match=r"words.csv: column 'label' not found \(columns: .*\); the header looks "
                                           r"like data: if the file has no header row, name its 7 columns with "
                                           r"data.columns: \[name1, name2, ...\]"):
        _prepare(project, **{"tabular.data.source": "data/raw/words.csv"})
    table["label"] = table["label"].str.replace("class_", "").astype(int)  # numbers only, as in UCI's files
    table.to_csv(project / "data/raw/headerless.csv", index=False, header=False)
    with pytest.raises(RatchetError) as info:
        _prepare(project, **{"tabular.data.source": "data/raw/headerless.csv"})
    message = str(info.value)
    assert "headerless.csv: the first row (" in message and "is all numbers: the file seems to have no header row" \
        in message and "name its 7 columns in params with data.columns: [name1, name2, ...]" in message
    assert "\n" not in message

    columns = list(table.columns)
    _, prepared = _prepare(project, **{"tabular.data.source": "data/raw/headerless.csv",
                                       "tabular.data.columns": columns})
    assert sum(prepared.meta.rows.values()) == len(table) == 300  # the first row is data, not lost
    assert prepared.meta.features == columns[:-1]
    # a wrong count of names is one line too
    with pytest.raises(RatchetError, match=r"headerless.csv: data.columns names 6 columns but the first row has 7"):
        _prepare(project, **{"tabular.data.source": "data/raw/headerless.csv", "tabular.data.columns": columns[1:]})


def test_a_headerless_series_is_refused_too(project):
    series = pd.read_csv(project / "data/raw/series.csv")
    series.to_csv(project / "data/raw/headerless.csv", index=False, header=False)
    with pytest.raises(RatchetError, match=r"headerless.csv: the first row \(20\d\d-\d\d-\d\d 00:00:00, .*\) is all numbers"):
        _prepare(project, "sequence", **{"sequence.data.source": "data/raw/headerless.csv"})
    _, prepared = _prepare(project, "sequence", **{"sequence.data.source": "data/raw/headerless.csv",
                                                   "sequence.data.columns": list(series.columns)})
    assert sum(prepared.meta.rows.values()) == len(series)


def test_repeated_column_names_and_other_separators_are_named(project):
    path = project / "data/raw/repeated.csv"
    path.write_text("a,b,a,label\n1,2,3,x\n4,5,6,y\n")
    with pytest.raises(RatchetError, match=r"repeated.csv: column name 'a' appears twice in the header "
                                           r"\(columns 1 and 3\); rename one"):
        _prepare(project, **{"tabular.data.source": "data/raw/repeated.csv"})
    table = pd.read_csv(project / "data/raw/table.csv")
    table.to_csv(project / "data/raw/semicolons.csv", index=False, sep=";")
    with pytest.raises(RatchetError, match=r"semicolons.csv: the header is one column 'f0;f1;.*'; the file seems to "
                                           r"be separated by ';': set data.delimiter: ';'"):
        _prepare(project, **{"tabular.data.source": "data/raw/semicolons.csv"})
    _, prepared = _prepare(project, **{"tabular.data.source": "data/raw/semicolons.csv", "tabular.data.delimiter": ";"})
    assert sum(prepared.meta.rows.values()) == 300


@pytest.mark.parametrize("value,read", [("inf", "inf"), ("-inf", "-inf"), ("1e39", "1e+39")])
def test_a_non_finite_value_is_refused_at_prepare_naming_file_column_and_line(project, value, read):
    table = pd.read_csv(project / "data/raw/table.csv").astype({"f3": object})
    table.loc[41, "f3"] = value
    table.to_csv(project / "data/raw/table.csv", index=False)
    write_params(project, tiny_params())
    proc = ratchet(project, "prepare", "tabular", check=False)
    assert proc.returncode == 2
    line = [line for line in proc.stderr.splitlines() if line.strip()]
    assert line == [f"error: {project / 'data/raw/table.csv'}: column 'f3', line 43: '{read}' is not a finite "
                    "float32 number (1 such values in the column; prepare.non_finite: impute treats them as missing)"]
    assert not (project / "data/prepared/tabular").exists()
    # with impute, it is a missing value: filled with the training median like the others
    _, prepared = _prepare(project, **{"tabular.prepare.non_finite": "impute"})
    assert np.isfinite(np.concatenate([prepared.array(f"{s}_x") for s in ("train", "val", "test")])).all()


def test_a_non_finite_value_in_a_series_is_refused_or_filled(project):
    series = pd.read_csv(project / "data/raw/series.csv").astype({"value": object})
    series.loc[100, "value"] = "-inf"
    series.to_csv(project / "data/raw/series.csv", index=False)
    with pytest.raises(RatchetError, match=r"series.csv: column 'value', line 102: '-inf' is not a finite float32 "
                                           r"number"):
        _prepare(project, "sequence")
    _, prepared = _prepare(project, "sequence", **{"sequence.data.gaps": "interpolate"})
    raw = prepared.array("train_raw")
    assert np.isfinite(raw).all() and prepared.meta.cleaning["train"]["non_finite"] == 1
    neighbours = pd.read_csv(project / "data/raw/series.csv")["value"].iloc[[99, 101]].astype(float)
    assert raw[100, 0] == pytest.approx(neighbours.mean(), rel=1e-5)


# -- calendar frequencies ----------------------------------------------------------------------

def _monthly(path, months=60, drop=()):
    """Month starts (28 to 31 days apart) with a yearly cycle; `drop` leaves months out."""
    stamps = pd.date_range("2015-01-01", periods=months, freq="MS")
    values = 10 + 3 * np.sin(2 * np.pi * np.arange(months) / 12)
    frame = pd.DataFrame({"timestamp": stamps.strftime("%Y-%m-%d"), "value": values, "temp": values / 2})
    frame.drop(index=list(drop)).to_csv(path, index=False)


MONTHLY = {"sequence.window.input": 12, "sequence.window.horizon": 1, "sequence.evaluate.seasonal_period": 12,
           "sequence.prepare.val_fraction": 0.2, "sequence.prepare.test_fraction": 0.2}


@pytest.mark.parametrize("frequency", ["MS", "1MS", None])
def test_month_starts_are_a_grid_given_or_inferred(project, frequency):
    _monthly(project / "data/raw/series.csv")
    _, prepared = _prepare(project, "sequence", **MONTHLY, **{"sequence.data.frequency": frequency})
    meta = prepared.meta
    assert meta.frequency == "1MS" and meta.rows == {"train": 36, "val": 12, "test": 12}
    assert meta.windows == {"train": 36 - 12, "val": 12, "test": 12} and meta.context["test"] == 12
    times = pd.to_datetime(prepared.array("test_time"))
    assert (times.day == 1).all() and len(set(np.diff(times.asi8))) > 1  # month lengths differ


def test_a_missing_month_is_a_gap_on_the_calendar_grid(project):
    _monthly(project / "data/raw/series.csv", drop=[20])
    with pytest.raises(RatchetError, match=r"series.csv: 1 missing step\(s\) of 1MS; the first gap is after "
                                           r"2016-08-01 00:00:00, next row 2016-10-01 00:00:00"):
        _prepare(project, "sequence", **MONTHLY)
    _, prepared = _prepare(project, "sequence", **MONTHLY, **{"sequence.data.gaps": "ffill"})
    assert prepared.meta.cleaning["train"]["filled_steps"] == 1


def test_a_frequency_far_finer_than_the_data_is_refused_before_the_grid_is_built(project):
    """`frequency: 1ms` on hourly data would fill 1.7 billion steps (a MemoryError, 10 GiB on
    the way): one line instead, at once."""
    from conftest import make_series

    make_series(project / "data/raw/series.csv", steps=480)
    with pytest.raises(RatchetError, match=r"series.csv: data.frequency 1ms makes 1,724,400,000 steps for 480 rows; "
                                           r"is it the series' step\?$"):
        _prepare(project, "sequence", **{"sequence.data.frequency": "1ms", "sequence.data.gaps": "ffill"})


def test_month_ends_business_days_and_bad_frequencies(project):
    ends = pd.date_range("2015-01-31", periods=60, freq="ME")
    pd.DataFrame({"timestamp": ends, "value": np.arange(60.0), "temp": 1.0}).to_csv(
        project / "data/raw/series.csv", index=False)
    for frequency in (None, "ME", "M"):  # M: the month end pandas now calls ME
        _, prepared = _prepare(project, "sequence", **MONTHLY, **{"sequence.data.frequency": frequency})
        assert prepared.meta.frequency == "1ME"
    with pytest.raises(RatchetError, match=r"series.csv: timestamp 2015-01-31 00:00:00 is off the 1MS grid"):
        _prepare(project, "sequence", **MONTHLY, **{"sequence.data.frequency": "MS"})
    with pytest.raises(RatchetError, match=r"data.frequency 'monthly': not a pandas frequency \(e.g. 15min, 1h"):
        _prepare(project, "sequence", **MONTHLY, **{"sequence.data.frequency": "monthly"})

    weekdays = pd.bdate_range("2024-01-01", periods=200)  # no weekends: 1-day steps, 3 over each weekend
    pd.DataFrame({"timestamp": weekdays, "value": np.arange(200.0), "temp": 1.0}).to_csv(
        project / "data/raw/series.csv", index=False)
    _, prepared = _prepare(project, "sequence", **MONTHLY)
    assert prepared.meta.frequency == "1B" and prepared.meta.cleaning["train"]["filled_steps"] == 0


# -- images ------------------------------------------------------------------------------------

def test_a_16_bit_image_is_converted_by_its_range_not_saturated(tmp_path):
    from ratchet.data.image import decode

    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    pixels = decode(tmp_path / "deep.png", "L", (16, 16))[0]
    np.testing.assert_array_equal(pixels[0], np.rint(np.linspace(0, 255, 16)).astype(np.uint8))
    rgb = decode(tmp_path / "deep.png", "RGB", (16, 16))
    assert rgb.shape == (3, 16, 16) and (rgb[0] == pixels).all()
    Image.fromarray(np.full((4, 4), 0.5, np.float32), mode="F").save(tmp_path / "float.tif")
    assert decode(tmp_path / "float.tif", "L", (4, 4)).max() == 128  # floats in [0, 1]


# -- imbalanced classes -----------------------------------------------------------------------

def _imbalanced(project):
    make_csv(project / "data/raw/table.csv", rows=400, classes=3, seed=3)
    table = pd.read_csv(project / "data/raw/table.csv")
    keep = (table["label"] != "class_2") | (np.arange(len(table)) % 8 == 0)  # class_2 rare
    table[keep].to_csv(project / "data/raw/table.csv", index=False)


def test_balanced_class_weights_are_inverse_training_frequencies_in_the_loss(project):
    _imbalanced(project)
    cfg, prepared = _prepare(project, **{"tabular.train.class_weights": "balanced"})
    counts = np.array(prepared.meta.class_counts["train"])
    assert counts.min() * 4 < counts.max()
    loss, _ = get_family("tabular").objective(cfg, prepared.meta, torch.device("cpu"))
    want = counts.sum() / (3 * counts)
    np.testing.assert_allclose(loss.weight.numpy(), want, rtol=1e-6)
    logits, target = torch.randn(5, 3), torch.tensor([0, 1, 2, 2, 1])
    by_hand = (torch.nn.functional.cross_entropy(logits, target, reduction="none") * loss.weight[target]).sum() \
        / loss.weight[target].sum()
    torch.testing.assert_close(loss(logits, target), by_hand)
    cfg, prepared = _prepare(project)
    assert get_family("tabular").objective(cfg, prepared.meta, torch.device("cpu"))[0].weight is None


def test_balanced_sampler_draws_every_class_equally_and_ranks_share_one_draw(project):
    _imbalanced(project)
    cfg, prepared = _prepare(project, **{"tabular.train.sampler": "balanced"})
    family = get_family("tabular")
    weights = family.sample_weights(cfg, prepared)
    y = np.asarray(prepared.array("train_y"))
    loader = BatchLoader(family.samples(cfg, prepared, "train"), 32, DistInfo(0, 0, 1, torch.device("cpu")),
                         train=True, seed=cfg.seed, weights=weights)
    drawn = []
    for epoch in range(20):
        loader.set_epoch(epoch)
        drawn.append(loader.indices().numpy())
    assert not np.array_equal(drawn[0], drawn[1])  # a new draw every epoch
    shares = np.bincount(y[np.concatenate(drawn)], minlength=3) / (20 * len(y))
    np.testing.assert_allclose(shares, 1 / 3, atol=0.03)  # the natural shares are far from equal
    assert np.bincount(y, minlength=3).min() / len(y) < 0.15
    loader.set_epoch(0)
    np.testing.assert_array_equal(loader.indices().numpy(), drawn[0])  # the seed fixes each epoch's draw
    ranks = [WeightedDistributedSampler(weights, 2, rank, cfg.seed) for rank in (0, 1)]
    shards = [list(sampler) for sampler in ranks]
    assert len(shards[0]) == len(shards[1]) == -(-len(y) // 2)
    interleaved = [i for pair in zip(*shards) for i in pair]  # rank r deals draws r, r + 2, ...: one shared draw
    shared = torch.multinomial(torch.from_numpy(np.asarray(weights, np.float64)), len(interleaved), replacement=True,
                               generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    assert interleaved == shared
    assert get_family("tabular").sample_weights(_prepare(project)[0], prepared) is None


def test_balanced_weights_apply_to_every_head_of_a_multihead_network(tmp_path):
    from conftest import make_group_tree

    make_group_tree(tmp_path / "data/raw/groups", groups=("Alpha",), per_group=5)  # 5 characters
    make_group_tree(tmp_path / "data/raw/groups", groups=("Beta",), per_group=2, seed=1)  # 2: a rare group
    cfg, prepared = _prepare(tmp_path, "multihead", **{"multihead.train.class_weights": "balanced"})
    meta = prepared.meta
    loss, _ = get_family("multihead").objective(cfg, meta, torch.device("cpu"))
    outputs = {"class": torch.randn(4, 7), "group": torch.randn(4, 2)}
    targets = {"class": torch.tensor([0, 1, 5, 6]), "group": torch.tensor([0, 0, 1, 1])}
    _, parts = loss(outputs, targets)
    classes = np.array(meta.class_counts["train"], dtype=np.float64)
    groups = np.bincount(meta.class_group, weights=classes)
    assert groups[0] > 2 * groups[1]
    for head, counts in (("class", classes), ("group", groups)):
        weight = torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32)
        want = torch.nn.functional.cross_entropy(outputs[head], targets[head], weight=weight)
        torch.testing.assert_close(parts[head], want)
    assert get_family("multihead").sample_weights(cfg, prepared) is None  # sampler: shuffle


def test_training_with_balanced_weights_and_sampler_logs_the_weights(project):
    from conftest import mlflow_client

    from ratchet.cli import main

    _imbalanced(project)
    write_params(project, tiny_params(**{"tabular.train.class_weights": "balanced",
                                         "tabular.train.sampler": "balanced", "tabular.train.epochs": 2}))
    for stage in ("prepare", "train"):
        assert main([stage, "tabular", "--params", str(project / "params.yaml")]) == 0
    run_id = json.loads((project / "models/tabular/run.json").read_text())["run_id"]
    logged = mlflow_client(project).get_run(run_id).data.params
    counts = np.array(load_prepared(project / "data/prepared/tabular").meta.class_counts["train"])
    want = counts.sum() / (3 * counts)
    assert [float(logged[f"class_weight.class_{c}"]) for c in range(3)] == pytest.approx(want, rel=1e-5)
    assert logged["train.sampler"] == "balanced"


def test_a_last_training_batch_of_one_sample_is_left_out_of_that_epoch():
    """129 rows in batches of 32 would end with a batch of one, which BatchNorm refuses."""
    loader = BatchLoader((np.zeros((129, 2), np.float32), np.zeros(129, np.int64)), 32,
                         DistInfo(0, 0, 1, torch.device("cpu")), train=True, seed=0)
    sizes = [len(targets) for _, targets in loader]
    assert sizes == [32, 32, 32, 32] and len(loader) == 4
    loader.set_epoch(1)
    left_out = set(range(129)) - set(loader.indices().tolist())
    loader.set_epoch(2)
    assert len(left_out) == 1 and left_out != set(range(129)) - set(loader.indices().tolist())
