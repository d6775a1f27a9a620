"""What the benchmarks share: alternating rounds, the hand-optimised raw training loop, thread
count, and the JSON line each script ends with. Not a benchmark itself."""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")


def set_threads(threads: int) -> int:
    """Intra-op threads for both sides alike (0: as torch chose); the count in use.

    On a machine shared with other jobs, 1 thread gives far steadier timings for small models:
    with 2 threads and one core taken by someone else, every parallel region waits for the
    descheduled thread (single rounds of the tabular loop took 0.16 s or 7 s)."""
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def alternate(sides: dict[str, Callable[[], T]], rounds: int, warmup: bool = True) -> dict[str, list[T]]:
    """Run every side once per round, in the given order on even rounds and reversed on odd ones,
    so drift in the machine's load and the position in a round hit every side alike. Each side
    returns its timing (seconds, or a list of them); the lists come back per side, one entry per
    round. A first untimed round (`warmup`) pays for lazy initialisation and kernel selection."""
    if warmup:
        for side in sides.values():
            side()
    times: dict[str, list[T]] = {name: [] for name in sides}
    for r in range(rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            times[name].append(sides[name]())
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(base: list[float], other: list[float]) -> float:
    """Median over rounds of base / other (seconds, so: other's speed relative to base's), each
    round's two runs taken minutes apart at most: steadier than a ratio of medians when the
    machine's load changes between rounds."""
    return statistics.median(b / o for b, o in zip(base, other))


def raw_optimizer(net: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
    """Adam with its fused kernel, as ratchet.train.optim.build_optimizer makes it."""
    return torch.optim.Adam(net.parameters(), lr=lr, fused=True)


def raw_epochs(net: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, inputs: torch.Tensor,
               targets: torch.Tensor, batch_size: int, epochs: int,
               augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[float]:
    """A hand-optimised training loop; seconds per epoch.

    The data already on the device as whole tensors; per epoch one permutation (on the device)
    and `net.train()` (as a loop that validates between epochs must); per batch one
    `index_select` per tensor, the augmentation if any, forward, loss, backward, step; the
    epoch's loss summed on the device and read once at its end, which waits for the device.
    The timing starts from a collected heap."""
    n, times = len(inputs), []
    gc.collect()  # as the other sides do: garbage from building the model is not the loop's
    for _ in range(epochs):
        started = time.perf_counter()
        net.train()
        order = torch.randperm(n, device=inputs.device)
        total = torch.zeros((), device=inputs.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            x = inputs.index_select(0, idx)
            if augment is not None:
                x = augment(x)
            loss = loss_fn(net(x), targets.index_select(0, idx))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        total.item()
        times.append(time.perf_counter() - started)
    return times


def print_json(values: dict) -> None:
    """The script's last line: its ratios, rounded, for a reader or a script."""
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()}))
