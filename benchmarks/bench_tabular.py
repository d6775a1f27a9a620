"""Tabular benchmarks, side by side in one run (ratios: these machines are noisy).

    .venv/bin/python benchmarks/bench_tabular.py --csv ../shared/data/water_potability.csv

1. Throughput: Ratchet's Trainer against the plain PyTorch loop the course writes (a Dataset
   returning one row per __getitem__, a DataLoader, the same MLP, batch size and epochs), on
   the same prepared training split. `fit()` includes the Trainer's per-epoch validation,
   which the plain loop does not do; `epochs only` runs the Trainer's training epochs alone,
   like for like. Rounds alternate, medians are reported.
2. No framework tax: the Trainer's training epochs against a hand-optimised raw loop
   (common.raw_epochs: the same model and fused Adam, the data as in-memory tensors, one
   `index_select` per tensor per batch), many short alternating rounds; goal >= 0.97 at batch 256.
3. Stage overhead: the real `ratchet train` command in a scratch project, minus its training
   loop: process start-up and imports, data loading, MLflow run, per-epoch and model logging,
   registration. The promote stage (the gate: both models loaded from the registry and
   re-scored on the test split) is reported beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
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
from common import alternate, median, paired_ratio, print_json, raw_epochs, raw_optimizer, set_threads
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
    gc.collect()  # what building the model and loaders left is not the epochs' garbage
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


def train_config(batch_size: int, epochs: int) -> TrainConfig:
    return TrainConfig.model_validate({"out_dir": "-", "checkpoint": "-", "epochs": epochs, "batch_size": batch_size,
                                       "device": "cpu", "early_stopping": {"patience": None}})


def ratchet_trainer(x, y, vx, vy, batch_size: int, epochs: int, validate: bool = True) -> float:
    torch.manual_seed(0)
    net = MLP(x.shape[1], 2, MODEL)
    cfg = train_config(batch_size, epochs)
    trainer = Trainer(net, build_optimizer(cfg.optimizer, net), None, nn.CrossEntropyLoss(),
                      BatchLoader([torch.from_numpy(x), torch.from_numpy(y)], batch_size, ALONE, train=True),
                      BatchLoader([torch.from_numpy(vx), torch.from_numpy(vy)], batch_size, ALONE, train=False),
                      validation_metrics(2, ALONE.device), ALONE, cfg)
    gc.collect()  # what building the model and loaders left is not the epochs' garbage
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # its per-epoch lines
        if validate:
            trainer.fit()
        else:
            for epoch in range(epochs):
                trainer._run_epoch(epoch)
    return time.perf_counter() - started


def raw_loop(x, y, batch_size: int, epochs: int) -> float:
    torch.manual_seed(0)
    net = MLP(x.shape[1], 2, MODEL)
    return sum(raw_epochs(net, raw_optimizer(net), nn.CrossEntropyLoss(), torch.from_numpy(x), torch.from_numpy(y),
                          batch_size, epochs))


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


def against_raw(prepared_dir: Path, batch_sizes: list[int], epochs: int, rounds: int) -> list[dict]:
    """The Trainer's training epochs (no validation) against the raw loop, same model and data."""
    data = get_family("tabular").load(prepared_dir)
    x, y = (np.array(a) for a in data.split("train"))
    vx, vy = (np.array(a) for a in data.split("val"))
    net = MLP(x.shape[1], 2, MODEL)  # the raw loop's optimizer is the Trainer's, setting for setting
    assert build_optimizer(train_config(256, 1).optimizer, net).defaults == raw_optimizer(net).defaults
    rows = []
    for batch in batch_sizes:
        # The raw loop twice: how far two runs of the same code drift apart on this machine is the
        # resolution of the Trainer's ratio (identical sides differed by 3-10% in 41 rounds).
        times = alternate({"raw": lambda: raw_loop(x, y, batch, epochs),
                           "trainer": lambda: ratchet_trainer(x, y, vx, vy, batch, epochs, validate=False),
                           "raw_again": lambda: raw_loop(x, y, batch, epochs)}, rounds)
        samples = len(x) * epochs
        r, t, a = median(times["raw"]), median(times["trainer"]), median(times["raw_again"])
        rows.append({"batch": batch, "raw": samples / r, "trainer": samples / t, "ratio": r / t,
                     "paired": paired_ratio(times["raw"], times["trainer"]), "control": r / a})
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
    parser.add_argument("--raw-rounds", type=int, default=101, help="rounds of the Trainer against the raw loop")
    parser.add_argument("--raw-epochs", type=int, default=5, help="epochs per round there (short rounds pair better)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads, both sides alike (0: torch's)")
    parser.add_argument("--no-overhead", action="store_true", help="skip part 3 (the stage overhead)")
    args = parser.parse_args()
    set_threads(args.threads)
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
        course = throughput(Path(tmp) / "prepared", args.batch_sizes, args.epochs, args.rounds)
        for r in course:
            print(f"{r['batch']:>6} {r['plain']:>11,.0f} {r['fit']:>14,.0f} {r['fit_ratio']:>5.2f}x "
                  f"{r['loop']:>12,.0f} {r['loop_ratio']:>5.2f}x")
        print(f"\nno framework tax: Trainer epochs vs the hand-optimised raw loop, {args.raw_epochs} epochs a round, "
              f"median of {args.raw_rounds} alternating rounds")
        print(f"{'batch':>6} {'raw loop':>11} {'Trainer epochs':>15} {'ratio':>6} {'paired':>7} "
              f"{'raw/raw again':>14}   (samples/s)")
        raw = against_raw(Path(tmp) / "prepared", args.batch_sizes, args.raw_epochs, args.raw_rounds)
        for r in raw:
            print(f"{r['batch']:>6} {r['raw']:>11,.0f} {r['trainer']:>15,.0f} {r['ratio']:>6.3f} {r['paired']:>7.3f} "
                  f"{r['control']:>14.3f}")
    if not args.no_overhead:
        print_overhead(args.csv, args.epochs)
    main_batch = 256 if 256 in args.batch_sizes else max(args.batch_sizes)
    at = {r["batch"]: r for r in raw}
    print_json({"batch": main_batch, "trainer_vs_raw": at[main_batch]["ratio"],
                "trainer_vs_raw_paired": at[main_batch]["paired"], "raw_vs_raw_again": at[main_batch]["control"],
                "fit_vs_course": {r["batch"]: round(r["fit_ratio"], 4) for r in course},
                "epochs_vs_course": {r["batch"]: round(r["loop_ratio"], 4) for r in course},
                "trainer_vs_raw_by_batch": {r["batch"]: round(r["ratio"], 4) for r in raw}})


def print_overhead(csv: Path, epochs: int) -> None:
    print(f"\nstage overhead: `ratchet train` ({epochs} epochs at batch 256) minus its training loop")
    print(f"{'':>26} {'train wall':>10} {'fit':>6} {'overhead':>9} {'of which: in-process startup':>29} "
          f"{'logging+registration':>21} {'promote (gate)':>15}")
    for t in overhead(csv, epochs):
        print(f"{t['run']:>26} {t['train_wall_s']:>9.1f}s {t['fit_seconds']:>5.1f}s {t['overhead_s']:>8.1f}s "
              f"{t['startup_seconds']:>28.1f}s {t['logging_seconds']:>20.1f}s {t['promote_wall_s']:>14.1f}s")


if __name__ == "__main__":
    main()
