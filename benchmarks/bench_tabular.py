"""Tabular benchmarks, side by side in one run (ratios: these machines are noisy).

    .venv/bin/python benchmarks/bench_tabular.py --csv ../shared/data/water_potability.csv

1. Throughput: Ratchet's Trainer against the plain PyTorch loop the course writes (a Dataset
   returning one row per __getitem__, a DataLoader, the same MLP, batch size and epochs), on
   the same prepared training split. `fit()` includes the Trainer's per-epoch validation,
   which the plain loop does not do; `epochs only` runs the Trainer's training epochs alone,
   like for like. Rounds alternate, medians are reported.
2. Stage overhead: the real `ratchet train` command in a scratch project, minus its training
   loop: process start-up and imports, data loading, MLflow run, per-epoch and model logging,
   registration. The promote stage (the gate: both models loaded from the registry and
   re-scored on the test split) is reported beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ratchet.config import MLPConfig, TrainConfig, load_params
from ratchet.families import get_family
from ratchet.evaluate.metrics import validation_metrics
from ratchet.models.mlp import MLP
from ratchet.stages import prepare
from ratchet.train.distributed import DistInfo
from ratchet.train.loader import BatchLoader
from ratchet.train.optim import build_optimizer
from ratchet.train.trainer import Trainer

MODEL = MLPConfig(hidden=[16, 8], activation="elu", batchnorm=True, init="he")  # the course's water-potability net
ALONE = DistInfo(0, 0, 1, torch.device("cpu"))


class WaterDataset(Dataset):
    """The course's Dataset: the table as one array, one row per __getitem__."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.data = np.hstack([x, y[:, None].astype(np.float32)])

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        features = self.data[idx, :-1]
        label = self.data[idx, -1]
        return features, label


def plain_loop(x, y, batch_size: int, epochs: int) -> float:
    torch.manual_seed(0)
    net = MLP(x.shape[1], 2, MODEL)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    loader = DataLoader(WaterDataset(x, y), batch_size=batch_size, shuffle=True)
    started = time.perf_counter()
    for _ in range(epochs):
        net.train()
        for features, labels in loader:
            optimizer.zero_grad()
            outputs = net(features.float())
            loss = criterion(outputs, labels.long())
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


def ratchet_trainer(x, y, vx, vy, batch_size: int, epochs: int, validate: bool = True) -> float:
    torch.manual_seed(0)
    net = MLP(x.shape[1], 2, MODEL)
    cfg = TrainConfig.model_validate({"out_dir": "-", "checkpoint": "-", "epochs": epochs, "batch_size": batch_size,
                                      "device": "cpu", "early_stopping": {"patience": None}})
    trainer = Trainer(net, build_optimizer(cfg.optimizer, net), None, nn.CrossEntropyLoss(),
                      BatchLoader([torch.from_numpy(x), torch.from_numpy(y)], batch_size, ALONE, train=True),
                      BatchLoader([torch.from_numpy(vx), torch.from_numpy(vy)], batch_size, ALONE, train=False),
                      validation_metrics(2, ALONE.device), ALONE, cfg)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # its per-epoch lines
        if validate:
            trainer.fit()
        else:
            for epoch in range(epochs):
                trainer._run_epoch(epoch)
    return time.perf_counter() - started


def throughput(prepared_dir: Path, batch_sizes: list[int], epochs: int, rounds: int) -> list[dict]:
    data = get_family("tabular").load(prepared_dir)
    x, y = (np.array(a) for a in data.split("train"))
    vx, vy = (np.array(a) for a in data.split("val"))
    rows = []
    for batch in batch_sizes:
        plain, fit, loop = [], [], []
        for _ in range(rounds):  # alternate, so drift in machine load hits all alike
            plain.append(plain_loop(x, y, batch, epochs))
            fit.append(ratchet_trainer(x, y, vx, vy, batch, epochs))
            loop.append(ratchet_trainer(x, y, vx, vy, batch, epochs, validate=False))
        samples = len(x) * epochs
        p, f, o = (statistics.median(t) for t in (plain, fit, loop))
        rows.append({"batch": batch, "plain": samples / p, "fit": samples / f, "fit_ratio": p / f,
                     "loop": samples / o, "loop_ratio": p / o})
    return rows


def overhead(csv: Path, epochs: int) -> list[dict]:
    """Run the real stages twice in a scratch project (the first run also creates the database)."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
        section = params["pipelines"]["tabular"]
        section["data"] = {"source": str(csv.resolve()), "label": "Potability", "exclude": []}
        section["model"] = MODEL.model_dump()
        section["train"].update(epochs=epochs, batch_size=256, device="cpu")
        section["train"]["early_stopping"] = {"patience": None}
        section["promote"]["registered_model"] = "water_potability"
        (project / "params.yaml").write_text(yaml.safe_dump({"demo": params["demo"], "pipelines": {"tabular": section}}))
        prepare.run(load_params(project / "params.yaml"), "tabular")
        for attempt in ("first run (new database)", "second run"):
            timings = {"run": attempt}
            for stage in ("train", "promote"):
                started = time.perf_counter()
                subprocess.run([sys.executable, "-m", "ratchet", stage, "tabular"], cwd=project, check=True,
                               capture_output=True)
                timings[f"{stage}_wall_s"] = time.perf_counter() - started
            run = json.loads((project / "models/tabular/run.json").read_text())
            timings.update(run["timings"])
            timings["overhead_s"] = timings["train_wall_s"] - run["timings"]["fit_seconds"]
            results.append(timings)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", type=Path, required=True, help="water_potability.csv")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256])
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())  # as the machine gives it; both sides alike
    with tempfile.TemporaryDirectory() as tmp:
        params = {"demo": {"dir": "demo"}, "pipelines": {"tabular": {
            "family": "tabular", "data": {"source": str(args.csv.resolve()), "label": "Potability"},
            "prepare": {"out_dir": "prepared"}, "train": {"out_dir": "m", "checkpoint": "c"},
            "evaluate": {"out_dir": "e", "metrics": "e.json", "plots": "pl"},
            "promote": {"registered_model": "w", "out": "p"}}}}
        (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(params))
        meta = prepare.run(load_params(Path(tmp) / "params.yaml"), "tabular")
        print(f"\nthroughput: {meta.rows['train']} training rows x {args.epochs} epochs, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} alternating rounds")
        print(f"{'batch':>6} {'plain loop':>11} {'Trainer fit()':>14} {'ratio':>6} {'epochs only':>12} {'ratio':>6}"
              "   (samples/s)")
        for r in throughput(Path(tmp) / "prepared", args.batch_sizes, args.epochs, args.rounds):
            print(f"{r['batch']:>6} {r['plain']:>11,.0f} {r['fit']:>14,.0f} {r['fit_ratio']:>5.2f}x "
                  f"{r['loop']:>12,.0f} {r['loop_ratio']:>5.2f}x")
    print(f"\nstage overhead: `ratchet train` ({args.epochs} epochs at batch 256) minus its training loop")
    print(f"{'':>26} {'train wall':>10} {'fit':>6} {'overhead':>9} {'of which: in-process startup':>29} "
          f"{'logging+registration':>21} {'promote (gate)':>15}")
    for t in overhead(args.csv, args.epochs):
        print(f"{t['run']:>26} {t['train_wall_s']:>9.1f}s {t['fit_seconds']:>5.1f}s {t['overhead_s']:>8.1f}s "
              f"{t['startup_seconds']:>28.1f}s {t['logging_seconds']:>20.1f}s {t['promote_wall_s']:>14.1f}s")


if __name__ == "__main__":
    main()
