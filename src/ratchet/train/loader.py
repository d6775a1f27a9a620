"""Batches gathered from whole arrays by index: one indexing op per batch.

The course's DataLoader calls `__getitem__` once per sample and collates the rows, which
costs far more than a small model's forward pass. Here a batch is `tensor[indices]`.

The samples are `(inputs, targets)`, each an array or a tuple/list/dict of arrays (several
inputs, several heads: see train/batch.py); every leaf is gathered by the same indices. A leaf
may also be windows over a series (ratchet.data.windows): views gathered the same way. Arrays that fit the preload budget (a quarter of the machine's memory, shared by the local
processes) are loaded once, onto the training device; larger ones stay memory-mapped and each
batch is read from disk by a background thread while the previous one trains. Either way the
batches are the same. An optional `transform` (augmentation, normalisation) is applied to the
batch's inputs (its first element) on the device.

Training order is torch's `DistributedSampler`'s (shuffled by seed, `set_epoch` every epoch,
padded so every process runs the same number of steps), computed as one tensor rather than a
Python list of every index, or, for a balanced sampler, weighted draws with replacement made the
same way on every process. Evaluation shards without padding (`range(rank, n, world_size)`), so
each sample is counted exactly once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from ratchet.train.batch import leaves, tree_map
from ratchet.train.distributed import DistInfo


def default_preload_bytes(local_processes: int = 1) -> int:
    """A quarter of physical memory, split between the processes of this machine."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return total // 4 // max(1, local_processes)


class BatchLoader:
    def __init__(
        self,
        samples: Sequence,
        batch_size: int,
        dist: DistInfo,
        *,
        train: bool,
        seed: int = 0,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        preload_bytes: int | None = None,
        weights: np.ndarray | None = None,
    ):
        """`samples` is a tuple, usually `(inputs, targets)`, whose leaves all have one row per
        sample; `batch_size` is per process; `train` selects shuffled+padded vs
        in-order+unpadded; `weights` (training only) makes each epoch a balanced draw with
        replacement, sample i with probability proportional to weights[i]."""
        budget = default_preload_bytes(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if preload_bytes is None \
            else preload_bytes
        samples = tuple(samples)
        size = sum(a.element_size() * a.nelement() if isinstance(a, torch.Tensor) else a.nbytes
                   for a in leaves(samples))
        self.streaming = size > budget
        if self.streaming:
            self.arrays = tree_map(lambda a: a.numpy() if isinstance(a, torch.Tensor) else a, samples)
            self.tensors = None
        else:
            self.tensors = tree_map(lambda a: _tensor(a).to(dist.device), samples)
        self.n = len(leaves(samples)[0])
        if any(len(leaf) != self.n for leaf in leaves(samples)):
            raise ValueError(f"samples of unequal length: {[len(leaf) for leaf in leaves(samples)]}")
        self.batch_size = batch_size
        self.dist = dist
        self.train = train
        self.transform = transform
        if not train:
            self.sampler = None
        elif weights is not None:
            self.sampler = WeightedDistributedSampler(weights, dist.world_size, dist.rank, seed)
        else:
            self.sampler = ShuffledSampler(range(self.n), num_replicas=dist.world_size, rank=dist.rank,
                                           shuffle=True, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        if hasattr(self.transform, "set_epoch"):
            self.transform.set_epoch(epoch, self.dist.rank)

    def indices(self) -> torch.Tensor:
        """This process's sample indices for the current epoch, in batch order."""
        if self.sampler is not None:
            idx = self.sampler.order()
            return idx[: self._kept(len(idx))]
        # sliced, not arange(rank, n, world): a rank past the last sample gets none (arange raises)
        return torch.arange(self.n)[self.dist.rank :: self.dist.world_size]

    def __len__(self) -> int:
        return -(-self._count() // self.batch_size)

    def batch_sizes(self) -> list[int]:
        """The number of samples in each of this process's batches of an epoch, in order."""
        full, rest = divmod(self._count(), self.batch_size)
        return [self.batch_size] * full + ([rest] if rest else [])

    def _count(self) -> int:
        """This process's samples per epoch (what `indices` returns)."""
        if self.sampler is not None:
            return self._kept(len(self.sampler))
        return len(range(self.dist.rank, self.n, self.dist.world_size))

    def _kept(self, count: int) -> int:
        """How many of an epoch's `count` training draws are used. A last batch of one sample
        breaks BatchNorm ("expected more than 1 value per channel"): it is left out of this
        epoch (the order is new every epoch)."""
        return count - 1 if count > 1 and count % self.batch_size == 1 else count

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        # Not through iter_with_indices: a generator layer per batch is ~1% of a small MLP's step.
        transform = self.transform
        for _, tensors in self._stream() if self.streaming else self._gather():
            yield tensors if transform is None else (transform(tensors[0]), *tensors[1:])

    def iter_with_indices(self) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
        """Like iteration, but also yields each batch's sample indices (for per-sample outputs)."""
        transform = self.transform
        for idx, tensors in self._stream() if self.streaming else self._gather():
            yield idx, tensors if transform is None else (transform(tensors[0]), *tensors[1:])

    def _gather(self) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
        idx = self.indices().to(self.dist.device)
        take = _gatherer(self.tensors)
        for start in range(0, len(idx), self.batch_size):
            batch = idx[start : start + self.batch_size]
            yield batch, take(batch)

    def _stream(self) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
        """Read batches from the memory-mapped arrays, one batch ahead on a background thread."""
        idx = self.indices()
        starts = range(0, len(idx), self.batch_size)
        pin = self.dist.device.type == "cuda"

        def read(start: int) -> tuple[torch.Tensor, tuple]:
            batch = idx[start : start + self.batch_size]
            rows = batch.numpy()
            tensors = tree_map(lambda a: torch.from_numpy(np.ascontiguousarray(a[rows])) if isinstance(a, np.ndarray)
                               else a[rows], self.arrays)
            return batch, tree_map(lambda t: t.pin_memory() if pin else t, tensors)

        with ThreadPoolExecutor(1) as reader:
            pending = reader.submit(read, starts[0]) if len(starts) else None
            for i in range(len(starts)):
                batch, tensors = pending.result()
                if i + 1 < len(starts):
                    pending = reader.submit(read, starts[i + 1])
                device = self.dist.device
                yield batch.to(device), tree_map(lambda t: t.to(device, non_blocking=pin), tensors)


class ShuffledSampler(DistributedSampler):
    """torch's DistributedSampler (shuffle, no drop_last), whose order is also given as one tensor.

    Iterating the parent builds a Python list of every index (randperm, `tolist`, padding and
    slicing lists, then an array from the list): on the 2,292 rows of the water-potability split
    that was ~0.1-0.3 ms an epoch, 2-4% of a training epoch at batch 256
    (benchmarks/bench_tabular.py). `order()` is the same sequence from tensor ops (a test checks it)."""

    def order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.dataset), generator=generator)
        if self.total_size > len(perm) > 0:  # padded as DistributedSampler pads: the permutation again from its start
            perm = perm.repeat(-(-self.total_size // len(perm)))[: self.total_size]
        return perm if self.num_replicas == 1 else perm[self.rank : self.total_size : self.num_replicas]


class WeightedDistributedSampler:
    """Each epoch, `len(weights)` draws with replacement (sample i with probability weights[i] /
    sum), from a generator seeded by (seed, epoch) and so the same on every process; the draws
    are padded to a multiple of the process count and dealt out like DistributedSampler's."""

    def __init__(self, weights: np.ndarray, world_size: int, rank: int, seed: int):
        weights = np.asarray(weights, dtype=np.float64)
        if weights.ndim != 1 or len(weights) == 0 or not np.all(np.isfinite(weights)) or (weights < 0).any() \
                or weights.sum() <= 0:
            raise ValueError("sample weights must be finite, non-negative and not all zero")
        self.weights = torch.from_numpy(weights)
        self.world_size, self.rank, self.seed, self.epoch = world_size, rank, seed, 0
        self.num_samples = -(-len(weights) // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def order(self) -> torch.Tensor:
        """This process's draws for the current epoch, as one int64 tensor."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.weights, self.num_samples * self.world_size, replacement=True,
                                  generator=generator)
        return draws[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())


def _gatherer(tree) -> Callable[[torch.Tensor], object]:
    """`indices -> the tree with every leaf's rows gathered by them` (one `index_select` a leaf),
    built once an epoch for the tree's shape, so that per batch no node's type is checked again."""
    if isinstance(tree, dict):
        parts = {key: _gatherer(value) for key, value in tree.items()}
        return lambda idx: {key: take(idx) for key, take in parts.items()}
    if isinstance(tree, (tuple, list)):
        kind, parts = type(tree), [_gatherer(value) for value in tree]
        return lambda idx: kind([take(idx) for take in parts])
    return partial(tree.index_select, 0)


def _tensor(array):
    """A tensor of a numpy array; tensors and windows (ratchet.data.windows) as they are."""
    return torch.from_numpy(np.array(array)) if isinstance(array, np.ndarray) else array
