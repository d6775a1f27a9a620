"""params.yaml validation: every bad value fails with one line naming the file and the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO, ratchet, tiny_params, write_params

from ratchet.config import config_hash, load_params
from ratchet.errors import RatchetError


def error_for(tmp_path: Path, params: dict | str) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(params) if isinstance(params, str) else write_params(tmp_path, params)
    with pytest.raises(RatchetError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_shipped_params_load_with_paths_resolved_against_the_params_file():
    params = load_params(REPO / "params.yaml")
    tabular = params.pipeline("tabular")
    assert tabular.data.source == REPO / "data/demo/breast_cancer.csv"
    assert tabular.train.checkpoint.is_absolute()
    assert tabular.train.batch_size % tabular.train.nproc == 0


def test_unknown_key_is_named(tmp_path):
    params = tiny_params()
    params["pipelines"]["tabular"]["train"]["optimzer"] = {"lr": 0.1}
    assert error_for(tmp_path, params) == "params.yaml: pipelines.tabular.train.optimzer: unknown key"


def test_wrong_type_is_named(tmp_path):
    message = error_for(tmp_path, tiny_params(**{"tabular.train.epochs": "ten"}))
    assert message.startswith("params.yaml: pipelines.tabular.train.epochs: must be a valid integer")
    assert "'ten'" in message


def test_out_of_range_is_named_with_the_value(tmp_path):
    message = error_for(tmp_path, tiny_params(**{"tabular.train.optimizer.lr": -0.1}))
    assert message == "params.yaml: pipelines.tabular.train.optimizer.lr: must be greater than 0 (got -0.1)"


def test_choice_outside_the_allowed_names(tmp_path):
    message = error_for(tmp_path, tiny_params(**{"tabular.train.optimizer.name": "lbfgs"}))
    assert message.startswith("params.yaml: pipelines.tabular.train.optimizer.name: must be 'sgd', 'adam'")


def test_missing_required_key(tmp_path):
    params = tiny_params()
    del params["pipelines"]["tabular"]["data"]["label"]
    assert error_for(tmp_path, params) == "params.yaml: pipelines.tabular.data.label: required key is missing"


def test_global_batch_must_split_evenly_over_processes(tmp_path):
    message = error_for(tmp_path, tiny_params(**{"tabular.train.batch_size": 33, "tabular.train.nproc": 2}))
    assert message == "params.yaml: pipelines.tabular.train: batch_size 33 is not divisible by nproc 2"


def test_split_fractions_must_leave_training_data(tmp_path):
    params = tiny_params(**{"tabular.prepare.val_fraction": 0.45, "tabular.prepare.test_fraction": 0.45})
    assert "must leave at least 20% for training" in error_for(tmp_path, params)


def test_section_without_family_and_unknown_family(tmp_path):
    params = tiny_params()
    params["pipelines"]["tabulr"] = {"data": {}}
    assert "tabulr: not a pipeline" in error_for(tmp_path, params)
    params = tiny_params(**{"tabular.family": "audio"})
    assert "pipelines.tabular: unknown family 'audio'" in error_for(tmp_path, params)


def test_invalid_yaml_names_the_line(tmp_path):
    assert error_for(tmp_path, "tabular:\n  family: tabular\n  data: [unclosed\n").startswith("params.yaml: line")


def test_unknown_pipeline_lists_the_known_ones(tmp_path):
    write_params(tmp_path, tiny_params())
    with pytest.raises(RatchetError, match=r"no pipeline 'images' under 'pipelines:' "
                                           r"\(pipelines: tabular, image, sequence, multihead\)"):
        load_params(tmp_path / "params.yaml").pipeline("images")


def test_config_hash_changes_with_hyperparameters_only(tmp_path):
    a = tiny_params()
    write_params(tmp_path, a)
    first = load_params(tmp_path / "params.yaml").pipeline("tabular")
    write_params(tmp_path, tiny_params(**{"tabular.train.optimizer.lr": 0.02}))
    second = load_params(tmp_path / "params.yaml").pipeline("tabular")
    assert config_hash(first.train, 1) == config_hash(first.train, 1)
    assert config_hash(first.train, 1) != config_hash(second.train, 1)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    write_params(tmp_path, tiny_params(**{"tabular.train.optimizer.lr": 0}))
    proc = ratchet(tmp_path, "train", "tabular", check=False)
    assert proc.returncode == 2
    assert proc.stderr == "error: params.yaml: pipelines.tabular.train.optimizer.lr: must be greater than 0 (got 0)\n"
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("key,value,message", [
    ("tabular.seed", -1, "pipelines.tabular.seed: must be greater than or equal to 0 (got -1)"),
    ("tabular.seed", 2**70, "pipelines.tabular.seed: must be less than or equal to 2147483647"),
    ("tabular.train.nproc", 64, "pipelines.tabular.train.nproc: 64 processes on the CPU, which has"),
])
def test_seeds_and_process_counts_are_bounded_at_load(tmp_path, key, value, message):
    from conftest import tiny_params, write_params

    write_params(tmp_path, tiny_params(**{key: value, "tabular.train.batch_size": 64 * 32}))
    with pytest.raises(RatchetError, match=re.escape(message)):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("schedule, expected", [
    ({"cron": "61 * * *"}, "params.yaml: schedule.cron: not a cron schedule (five fields"),
    ({"pipelines": ["nope"]}, "params.yaml: schedule.pipelines: no pipeline 'nope' under 'pipelines:'"),
    ({"when": "daily"}, "params.yaml: schedule.when: unknown key"),
])
def test_the_schedule_section_is_checked(tmp_path, schedule, expected):
    params = tiny_params()
    params["schedule"] = schedule
    with pytest.raises(RatchetError) as err:
        load_params(write_params(tmp_path, params))
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_the_schedule_defaults_to_mondays_and_every_pipeline(tmp_path):
    params = load_params(write_params(tmp_path, tiny_params()))
    assert params.schedule.cron == "0 3 * * 1" and params.schedule.pipelines == []
    shipped = load_params(REPO / "params.yaml").schedule
    assert shipped.cron == "0 3 * * 1" and shipped.pipelines == []


@pytest.mark.parametrize("numerics, expected", [
    ({"mode": "exact"}, "params.yaml: numerics.mode: must be 'portable' or 'fast' (got 'exact')"),
    ({"threads": 0}, "params.yaml: numerics.threads: must be greater than or equal to 1 (got 0)"),
    ({"isa": "avx2"}, "params.yaml: numerics.isa: unknown key"),
])
def test_the_numerics_section_is_checked(tmp_path, numerics, expected):
    params = tiny_params()
    params["numerics"] = numerics
    with pytest.raises(RatchetError) as err:
        load_params(write_params(tmp_path, params))
    assert str(err.value) == expected


def test_numerics_default_to_portable():
    """Committed metrics.json files are what portable mode reproduces on any AVX2 machine."""
    shipped = load_params(REPO / "params.yaml").numerics
    assert shipped.mode == "portable" and shipped.threads >= 1
