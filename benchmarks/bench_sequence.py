"""Sequence benchmarks, side by side in one run (ratios: these machines are noisy).

    .venv/bin/python benchmarks/bench_sequence.py --csv ../shared/data/electricity_consumption/electricity_train.csv

1. Windowing: the course's `create_sequences` (a pandas `iloc` loop appending one input window
   and one target per step, then `np.array`) against Ratchet's windows (`Tensor.unfold` views
   over the series, ratchet.data.windows), both on the whole training series, window 96,
   horizon 1. Time and peak memory (tracemalloc: numpy and Python allocations; torch's own
   allocations are counted by reading the bytes the windows hold). Then an epoch's worth of
   batch gathering from the views, to show where the copying went: one batch at a time.
2. Epoch time of LSTM training (the course's net: LSTM(1 -> 32, 2 layers) + Linear, Adam,
   MSE, batch 32): the course's loop (TensorDataset of the materialised windows, DataLoader
   with shuffle) against Ratchet's Trainer over the window views, on the first `--windows`
   windows. Rounds alternate; medians. With `--device cuda`, also windows/s on the GPU.
3. The recurrent cells themselves: one training step (forward, backward, Adam) of torch's RNN,
   LSTM and GRU (1 -> 32, one layer) on the same batch of 64 windows of 96 steps, as the
   electricity edit trains them: what a choice of `model.name` costs per step on this device.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ratchet.config import TrainConfig
from ratchet.data.windows import windows
from ratchet.families import get_family
from ratchet.train.distributed import DistInfo
from ratchet.train.loader import BatchLoader
from ratchet.train.optim import build_optimizer
from ratchet.train.trainer import Trainer

WINDOW = 96


def create_sequences(df: pd.DataFrame, seq_length: int) -> tuple[np.ndarray, np.ndarray]:
    """The course's windowing, as written there."""
    xs, ys = [], []
    for i in range(len(df) - seq_length):
        x = df.iloc[i : (i + seq_length), 1]
        y = df.iloc[i + seq_length, 1]
        xs.append(x)
        ys.append(y)
    return np.array(xs), np.array(ys)


class CourseLSTM(nn.Module):
    """The course's forecaster: LSTM over the window, Linear from the last output."""

    def __init__(self, hidden: int = 32, layers: int = 2):
        super().__init__()
        self.lstm = nn.LSTM(input_size=1, hidden_size=hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden, 1)

    def forward(self, x):
        h0 = torch.zeros(self.lstm.num_layers, x.size(0), self.lstm.hidden_size, device=x.device)
        c0 = torch.zeros(self.lstm.num_layers, x.size(0), self.lstm.hidden_size, device=x.device)
        out, _ = self.lstm(x, (h0, c0))
        return self.fc(out[:, -1, :])


def measure(fn):
    tracemalloc.start()
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, seconds, peak


def course_epochs(x: np.ndarray, y: np.ndarray, batch_size: int, epochs: int, device: torch.device) -> list[float]:
    dataset = TensorDataset(torch.tensor(x, dtype=torch.float32).unsqueeze(-1),
                            torch.tensor(y, dtype=torch.float32).unsqueeze(-1))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    torch.manual_seed(0)
    net = CourseLSTM().to(device)
    criterion, optimizer = nn.MSELoss(), torch.optim.Adam(net.parameters(), lr=1e-3)
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        net.train()
        for seqs, labels in loader:
            seqs, labels = seqs.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(net(seqs), labels)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def ratchet_trainer(series: np.ndarray, count: int, batch_size: int, dist: DistInfo) -> Trainer:
    part = torch.from_numpy(series[: count + WINDOW].astype(np.float32)).unsqueeze(-1)  # (T, 1)
    x, y = windows(part, part[:, 0], WINDOW, 1, 1)
    torch.manual_seed(0)
    net = CourseLSTM().to(dist.device)
    cfg = TrainConfig(out_dir="unused", checkpoint="unused", epochs=1, batch_size=batch_size,
                      device=dist.device.type, amp=False)
    loss_fn, metrics = get_family("sequence").objective(None, None, dist.device)
    loader = BatchLoader([x, y], batch_size, dist, train=True, seed=0)
    return Trainer(net, build_optimizer(cfg.optimizer, net), None, loss_fn, loader, loader, metrics, dist, cfg)


def ratchet_epochs(trainer: Trainer, epochs: int) -> list[float]:
    times = []
    for epoch in range(epochs):
        started = time.perf_counter()
        trainer._run_epoch(epoch)
        if trainer.dist.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def cell_steps(x: torch.Tensor, steps: int) -> dict[str, float]:
    """Median milliseconds of one training step of each recurrent cell on the batch `x`."""
    times = {}
    for name, cell in (("rnn", nn.RNN), ("lstm", nn.LSTM), ("gru", nn.GRU)):
        torch.manual_seed(0)
        net = cell(1, 32, batch_first=True).to(x.device)
        opt = torch.optim.Adam(net.parameters())
        laps = []
        for i in range(steps + 5):  # 5 warm-up steps
            start = time.perf_counter()
            opt.zero_grad()
            out, _ = net(x)
            out[:, -1].pow(2).mean().backward()
            opt.step()
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 5:
                laps.append(time.perf_counter() - start)
        times[name] = statistics.median(laps) * 1000
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", type=Path, default=Path("../shared/data/electricity_consumption/electricity_train.csv"))
    parser.add_argument("--windows", type=int, default=8192, help="training windows per epoch in part 2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=50, help="training steps per cell in part 3")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))

    df = pd.read_csv(args.csv)
    values = df.iloc[:, 1].to_numpy(np.float64).copy()  # writable: torch.from_numpy shares it
    series_bytes = values.nbytes
    (xs, ys), course_s, course_peak = measure(lambda: create_sequences(df, WINDOW))
    (x, y), ours_s, ours_peak = measure(lambda: windows(torch.from_numpy(values), torch.from_numpy(values), WINDOW, 1, 1))
    assert len(x) == len(xs) and torch.equal(x.index_select(0, torch.arange(len(x))), torch.from_numpy(xs))
    assert torch.equal(y.index_select(0, torch.arange(len(y)))[:, 0], torch.from_numpy(ys))
    held = x.nbytes  # the series the views read; the views allocate no window storage
    print(f"\nwindowing {len(values)} steps, window {WINDOW}, horizon 1 ({len(xs)} windows, identical):")
    print(f"{'':<28}{'seconds':>12}{'peak memory':>14}{'held after':>14}")
    print(f"{'course create_sequences':<28}{course_s:>12.4f}{course_peak / 2**20:>11.1f} MB"
          f"{(xs.nbytes + ys.nbytes) / 2**20:>11.1f} MB")
    print(f"{'ratchet windows (unfold)':<28}{ours_s:>12.6f}{ours_peak / 2**20:>11.3f} MB{held / 2**20:>11.1f} MB")
    print(f"time ratio: {course_s / ours_s:,.0f}x; peak memory ratio: {course_peak / max(ours_peak, 1):,.0f}x; "
          f"series itself: {series_bytes / 2**20:.1f} MB")
    gather = time.perf_counter()
    for start in range(0, len(x), 1024):
        x.index_select(0, torch.arange(start, min(start + 1024, len(x))))
    print(f"gathering every window once in batches of 1024: {time.perf_counter() - gather:.3f} s")
    del xs, ys

    count = min(args.windows, len(values) - WINDOW)
    cx, cy = create_sequences(df.iloc[: count + WINDOW], WINDOW)
    dist = DistInfo(0, 0, 1, device)
    trainer = ratchet_trainer(values, count, args.batch_size, dist)
    course_epochs(cx[:1024], cy[:1024], args.batch_size, 1, device)  # warm-up
    ratchet_epochs(trainer, 1)
    course, ours = [], []
    for r in range(args.rounds):
        course += course_epochs(cx, cy, args.batch_size, args.epochs, device)
        ours += ratchet_epochs(trainer, args.epochs)
        print(f"round {r + 1}: course {statistics.median(course):.2f} s/epoch, ratchet {statistics.median(ours):.2f} s/epoch")
    c, o = statistics.median(course), statistics.median(ours)
    print(f"\nLSTM(1->32, 2 layers) epoch over {count} windows of {WINDOW}, batch {args.batch_size}, {device}:")
    print(f"course loop {c:.2f} s ({count / c:,.0f} windows/s), ratchet trainer {o:.2f} s ({count / o:,.0f} windows/s); "
          f"ratio {c / o:.2f}x")

    cells = cell_steps(x.index_select(0, torch.arange(64)).unsqueeze(-1).float().to(device), args.steps)
    print(f"\none training step of each cell (1->32, 1 layer) on 64 windows of {WINDOW}, {device}, median of "
          f"{args.steps}: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in cells.items())
          + f"; gru/lstm {cells['gru'] / cells['lstm']:.2f}x")


if __name__ == "__main__":
    main()
