"""Shared fixtures: tiny real data, tiny params, and real git+DVC projects in temporary dirs.

Everything runs the real components at toy size: SQLite-backed MLflow, DVC, an ephemeral
Prefect server, gloo process groups. Nothing is mocked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# How long a test waits for a process or a file: a guard against a hang, not a speed check, so far
# above what any step takes on a loaded 2-core machine (an epoch of a tiny run took 50 s there).
PATIENCE = float(os.environ.get("RATCHET_TEST_PATIENCE", 1800))  # s

# Before prefect is imported anywhere: keep its database and settings out of the user's home.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="ratchet-test-prefect-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
import pipelines  # noqa: E402,F401  (sets Prefect's server start-up wait before prefect is imported)
os.environ["DO_NOT_TRACK"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("MLFLOW_REGISTRY_URI", None)
os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"  # `ratchet` for dvc.yaml's cmds
# One intra-op thread per process: `make test` runs two workers on two cores, and each starts
# stage processes; two threads each would have OpenMP's spinning threads wait on one another
# (a tiny epoch 30x slower). Before torch is imported; tiny_params pins the stages to it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri():
    """MLflow exports the URI of the last project a test used into os.environ; clear it so
    subprocesses and the next test start from their own project's database."""
    yield
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(var, None)


def make_csv(path: Path, rows: int = 300, features: int = 6, classes: int = 3, missing: float = 0.05,
             seed: int = 0, label: str = "label") -> Path:
    """A learnable classification table: class-dependent means, some missing values."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, rows)
    centres = rng.normal(0, 2, (classes, features))
    x = centres[y] + rng.normal(0, 1, (rows, features)) * rng.uniform(0.5, 3, features)
    x[rng.random(x.shape) < missing] = np.nan
    df = pd.DataFrame(x, columns=[f"f{i}" for i in range(features)])
    df[label] = [f"class_{c}" for c in y]
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


IMAGE_CLASSES = ("blue sky", "Zürich", "dots", "stripes")  # spaces and non-ASCII on purpose


def make_image_tree(root: Path, per_class: int = 12, classes: tuple[str, ...] = IMAGE_CLASSES, seed: int = 0,
                    size: tuple[int, int] = (20, 24)) -> Path:
    """An ImageFolder tree of learnable images: each class its own colour and pattern, with noise.
    Mixed formats and modes (RGB and greyscale PNG, JPEG, RGBA PNG) and sizes, as real trees are."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = size[0] + i % 3, size[1] - i % 2
            base = np.zeros((h, w, 3))
            base[..., c % 3] = 150
            if c % 2:
                base[:, ::3] = 255
            else:
                base[::4, ::4] = 255
            pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels, "RGB")
            kind = i % 4
            if kind == 0:
                image.save(folder / f"img_{i:03d}.png")
            elif kind == 1:
                image.save(folder / f"img_{i:03d}.jpg", quality=90)
            elif kind == 2:
                image.convert("L").save(folder / f"img_{i:03d}.png")
            else:
                image.convert("RGBA").save(folder / f"img_{i:03d}.png")
    return root


def tiny_image_section(source: str = "data/raw/images", **data) -> dict:
    """A small, fast `image` pipeline section (course CNN at 16x16)."""
    return {
        "family": "image",
        "seed": 7,
        "data": {"source": source, "channels": "rgb", "size": [16, 16], **data},
        "prepare": {"out_dir": "data/prepared/image", "val_fraction": 0.2, "test_fraction": 0.25},
        "augment": {"hflip": 0.5, "rotation": 15, "autocontrast": 0.2},
        "model": {"name": "cnn", "channels": [4, 8], "activation": "elu"},
        "train": {
            "out_dir": "models/image", "checkpoint": "checkpoints/image.pt",
            "epochs": 3, "batch_size": 8, "device": "cpu",
            "optimizer": {"name": "adam", "lr": 0.01},
            "early_stopping": {"patience": None},
        },
        "evaluate": {"out_dir": "reports/image/evaluation", "metrics": "reports/image/metrics.json",
                     "plots": "reports/image/plots", "batch_size": 64},
        "promote": {"registered_model": "image", "out": "reports/image/promotion.json"},
    }


def make_group_tree(root: Path, groups: tuple[str, ...] = ("Alpha", "Beta"), per_group: int = 3, per_class: int = 6,
                    seed: int = 0, size: tuple[int, int] = (20, 20)) -> Path:
    """A two-level tree `<group>/<class>/<image>`, 1-bit PNGs like Omniglot's: each class its own
    stroke pattern, each group its own stroke width; `character01` repeats in every group."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for g, group in enumerate(groups):
        for c in range(per_group):
            folder = root / group / f"character{c + 1:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.ones(size, dtype=bool)
                width = 1 + 2 * g
                if c % 3 == 0:
                    pixels[size[0] // 2 : size[0] // 2 + width, 2:-2] = False
                elif c % 3 == 1:
                    pixels[2:-2, size[1] // 2 : size[1] // 2 + width] = False
                else:
                    for k in range(width):
                        np.fill_diagonal(pixels[k:, :], False)
                pixels ^= rng.random(size) < 0.03
                Image.fromarray(pixels).convert("1").save(folder / f"{g}{c}_{i:02d}.png")
    return root


def tiny_multihead_section(source: str = "data/raw/groups", **model) -> dict:
    """A small, fast `multihead` pipeline (multi-output: group and class heads) at 16x16."""
    return {
        "family": "multihead",
        "seed": 7,
        "data": {"source": source, "channels": "grayscale", "size": [16, 16]},
        "prepare": {"out_dir": "data/prepared/multihead", "val_fraction": 0.2, "test_fraction": 0.25},
        "augment": {"rotation": 10},
        "model": {"name": "cnn", "inputs": ["image"], "heads": {"group": 0.3, "class": 1.0}, "channels": [4],
                  "hidden": 16, **model},
        "train": {
            "out_dir": "models/multihead", "checkpoint": "checkpoints/multihead.pt",
            "epochs": 3, "batch_size": 8, "device": "cpu", "monitor": "val_class_accuracy",
            "optimizer": {"name": "adam", "lr": 0.01},
            "early_stopping": {"patience": None},
        },
        "evaluate": {"out_dir": "reports/multihead/evaluation", "metrics": "reports/multihead/metrics.json",
                     "plots": "reports/multihead/plots", "batch_size": 64},
        "promote": {"registered_model": "multihead", "metric": "class.f1_macro",
                    "out": "reports/multihead/promotion.json"},
    }


def make_series(path: Path, steps: int = 480, seed: int = 0, freq: str = "h") -> Path:
    """A learnable hourly series: `value` with a daily cycle, a weekly one and AR(1) noise, and
    a covariate `temp` it responds to."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    temp = 10 + 5 * np.sin(2 * np.pi * t / 24) + rng.normal(0, 0.5, steps)
    noise = np.zeros(steps)
    for i in range(1, steps):
        noise[i] = 0.7 * noise[i - 1] + rng.normal(0, 1)
    value = 50 + 10 * np.sin(2 * np.pi * (t - 6) / 24) + 4 * (t // 24 % 7 >= 5) + 0.5 * temp + noise
    frame = pd.DataFrame({"timestamp": pd.date_range("2024-03-01", periods=steps, freq=freq),
                          "value": value.round(3), "temp": temp.round(3)})
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def tiny_sequence_section(source: str = "data/raw/series.csv", **data) -> dict:
    """A small, fast `sequence` pipeline section (GRU over a day of hourly steps)."""
    return {
        "family": "sequence",
        "seed": 7,
        "data": {"source": source, "target": "value", "features": ["value", "temp"], **data},
        "prepare": {"out_dir": "data/prepared/sequence", "val_fraction": 0.2, "test_fraction": 0.2},
        "window": {"input": 24, "horizon": 3, "stride": 1},
        "model": {"name": "gru", "hidden": 8},
        "train": {
            "out_dir": "models/sequence", "checkpoint": "checkpoints/sequence.pt",
            "epochs": 3, "batch_size": 32, "device": "cpu",
            "optimizer": {"name": "adam", "lr": 0.01},
            "early_stopping": {"patience": None},
        },
        "evaluate": {"out_dir": "reports/sequence/evaluation", "metrics": "reports/sequence/metrics.json",
                     "plots": "reports/sequence/plots", "batch_size": 64, "seasonal_period": 24, "plot_steps": 48},
        "promote": {"registered_model": "sequence", "metric": "rmse", "direction": "minimize",
                    "out": "reports/sequence/promotion.json"},
    }


def tiny_params(source: str = "data/raw/table.csv", label: str = "label", **overrides) -> dict:
    """params.yaml content for small, fast `tabular`, `image` and `sequence` pipelines; `overrides`
    are dotted keys, relative to `pipelines` unless they start with `demo`."""
    params = {"demo": {"dir": "data/demo"}, "numerics": {"mode": "portable", "threads": 1}, "pipelines": {
        "tabular": {
            "family": "tabular",
            "seed": 7,
            "data": {"source": source, "label": label},
            "prepare": {"out_dir": "data/prepared/tabular", "impute": "median"},
            "model": {"name": "mlp", "hidden": [16, 8], "dropout": 0.0},
            "train": {
                "out_dir": "models/tabular", "checkpoint": "checkpoints/tabular.pt",
                "epochs": 3, "batch_size": 32, "device": "cpu",
                "optimizer": {"name": "adam", "lr": 0.01},
                "early_stopping": {"patience": None},
            },
            "evaluate": {"out_dir": "reports/tabular/evaluation", "metrics": "reports/tabular/metrics.json",
                         "plots": "reports/tabular/plots", "batch_size": 1024},
            "promote": {"registered_model": "tabular", "out": "reports/tabular/promotion.json"},
        },
        "image": tiny_image_section(),
        "sequence": tiny_sequence_section(),
        "multihead": tiny_multihead_section(),
    }}
    for dotted, value in overrides.items():
        node = params if dotted.split(".")[0] in ("demo", "pipelines") else params["pipelines"]
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return params


def load_prepared(prepared_dir: Path):
    """A prepared directory, read by the family that wrote it (its meta.json says which)."""
    import json

    from ratchet.families import get_family

    family = json.loads((Path(prepared_dir) / "meta.json").read_text())["family"]
    return get_family(family).load(prepared_dir)


def write_params(project: Path, params: dict) -> Path:
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def ratchet(project: Path, *args: str, check: bool = True, timeout: float = PATIENCE) -> subprocess.CompletedProcess:
    """Run the `ratchet` CLI in `project` as a user would."""
    proc = subprocess.run([sys.executable, "-m", "ratchet", *args, "--params", str(project / "params.yaml")],
                          cwd=project, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ratchet {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True,
                          timeout=PATIENCE)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def git(project: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=test@ratchet", "-c", "user.name=test", *args], cwd=project,
                   check=True, capture_output=True)


def empty_mlflow_db() -> Path:
    """An empty SQLite tracking store as MLflow creates it, made once per machine and MLflow
    version (under the system's temp dir; a lock lets the two workers share it). Creating one runs
    MLflow's ~60 schema migrations, ~2-5 s on 2 cores, which most tests paid once each; the
    fixtures below copy this one instead. Tests of a store ratchet creates itself still run
    MLflow's creation (test_flow's second store, test_schedule, test_team, `make run`)."""
    import fcntl
    import importlib.metadata

    version = importlib.metadata.version("mlflow")
    folder = Path(tempfile.gettempdir()) / f"ratchet-test-mlflow-{version}-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    db = folder / "mlflow.db"
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not db.exists():
            partial = folder / "creating.db"
            partial.unlink(missing_ok=True)
            subprocess.run([sys.executable, "-c", "import sys, mlflow; mlflow.MlflowClient(sys.argv[1]).search_experiments()",
                            f"sqlite:///{partial}"], cwd=folder, check=True, capture_output=True, timeout=PATIENCE)
            partial.rename(db)
    return db


def with_empty_mlflow_db(root: Path) -> Path:
    shutil.copy(empty_mlflow_db(), root / "mlflow.db")
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A plain directory with a tiny CSV, image tree, series and params.yaml (no git, no DVC),
    and an empty tracking store."""
    make_csv(tmp_path / "data/raw/table.csv")
    make_image_tree(tmp_path / "data/raw/images")
    make_series(tmp_path / "data/raw/series.csv")
    make_group_tree(tmp_path / "data/raw/groups")
    write_params(tmp_path, tiny_params())
    return with_empty_mlflow_db(tmp_path)


@pytest.fixture
def dvc_project(tmp_path: Path) -> Path:
    """A git + DVC project: the repo's dvc.yaml and source tree (DVC hashes it as stage deps), and
    an empty tracking store (git-ignored, as in the repo)."""
    return with_empty_mlflow_db(make_dvc_project(tmp_path, tiny_params()))


def make_dvc_project(root: Path, params: dict) -> Path:
    """The tiny data, `params`, the repo's dvc.yaml and source tree, in a new git + DVC repo."""
    make_csv(root / "data/raw/table.csv")
    make_image_tree(root / "data/raw/images")
    make_series(root / "data/raw/series.csv")
    make_group_tree(root / "data/raw/groups")
    write_params(root, params)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (root / ".gitignore").write_text("mlflow.db\nmlruns/\ncheckpoints/\n")
    git(root, "init", "-q")
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    shutil.copytree(REPO / ".dvc/plots", root / ".dvc/plots")  # dvc.yaml's plot templates
    git(root, "add", "-A")
    git(root, "commit", "-qm", "tiny project")
    return root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, every: float = 1):
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` s."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def mlflow_client(project: Path):
    import mlflow

    uri = f"sqlite:///{project / 'mlflow.db'}"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def runs_by_status(project: Path) -> dict[str, int]:
    """How many MLflow runs of the project's database are in each status (empty if no database)."""
    if not (project / "mlflow.db").exists():
        return {}
    client = mlflow_client(project)
    counts: dict[str, int] = {}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            counts[run.info.status] = counts.get(run.info.status, 0) + 1
    return counts


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def pytest_sessionfinish(session, exitstatus):
    # The in-process Prefect test server logs "Stopping temporary server" from an atexit hook,
    # after pytest has closed the streams its handlers write to: not a failure, only noise.
    import logging

    logging.raiseExceptions = False


def pytest_collection_modifyitems(config, items):
    """Files with the most `slow` tests first. `make test` hands whole files to two workers
    (`--dist loadfile --no-loadscope-reorder`) in this order, so the long end-to-end files start
    at once and the many short ones fill the gaps; pytest-xdist's own order (most tests first)
    left the 5-minute flow file to the end (581 s against an estimated 513 s)."""
    slow_in_file: dict[str, int] = {}
    for item in items:
        slow_in_file[item.path] = slow_in_file.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow_in_file[item.path])  # stable: each file keeps its own order
