"""Batches gathered from whole tensors by index: one indexing op per batch.

The course's DataLoader calls `__getitem__` once per sample and collates the rows, which
costs far more than a small model's forward pass. Here the data is a few tensors already in
memory (on the device when there is room), and a batch is `tensor[indices]`.

Training order comes from torch's `DistributedSampler` (shuffled by seed, `set_epoch` every
epoch, padded so every process runs the same number of steps). Evaluation shards without
padding (`range(rank, n, world_size)`), so each sample is counted exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from ratchet.train.distributed import DistInfo


class BatchLoader:
    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        batch_size: int,
        dist: DistInfo,
        *,
        train: bool,
        seed: int = 0,
    ):
        """`batch_size` is per process; `train` selects shuffled+padded vs in-order+unpadded."""
        self.tensors = [t.to(dist.device) for t in tensors]
        self.n = len(self.tensors[0])
        self.batch_size = batch_size
        self.dist = dist
        self.train = train
        self.sampler = (
            DistributedSampler(range(self.n), num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed)
            if train
            else None
        )

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def indices(self) -> torch.Tensor:
        """This process's sample indices for the current epoch, in batch order."""
        if self.sampler is not None:
            return torch.from_numpy(np.fromiter(iter(self.sampler), np.int64, len(self.sampler)))
        return torch.arange(self.dist.rank, self.n, self.dist.world_size)

    def __len__(self) -> int:
        count = len(self.sampler) if self.sampler is not None else len(range(self.dist.rank, self.n, self.dist.world_size))
        return -(-count // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for _, batch in self.iter_with_indices():
            yield batch

    def iter_with_indices(self) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
        """Like iteration, but also yields each batch's sample indices (for per-sample outputs)."""
        idx = self.indices().to(self.dist.device)
        for start in range(0, len(idx), self.batch_size):
            batch = idx[start : start + self.batch_size]
            yield batch, tuple(t.index_select(0, batch) for t in self.tensors)
