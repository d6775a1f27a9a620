"""The one module that knows about process groups.

`ratchet train|evaluate` with nproc > 1 re-launches itself under torchrun (`launch`); each
process then calls `setup()`, which reads torchrun's environment and returns its rank, local
rank, world size and device. Multi-node runs call torchrun directly (see README), which sets
the same environment. Side effects (files, MLflow, printing) are gated on `is_main`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

from ratchet.errors import RatchetError, StageFailed


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(nproc: int, stage: str, pipeline: str, params_file: str) -> None:
    """Run `ratchet <stage> <pipeline>` as `nproc` local processes under torchrun (each process
    gets an equal share of the CPU threads); raise if any of them fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "ratchet", stage, pipeline, "--params", params_file]
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    process = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": threads})
    try:
        code = process.wait()
    except BaseException:  # Ctrl-C or SIGTERM (the CLI turns it into KeyboardInterrupt): stop the workers too
        process.send_signal(signal.SIGTERM)  # torchrun passes it on; each worker closes its run as KILLED
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
    if code != 0:
        # A worker's own error (bad data, params) was printed above as `error: ...`; this line
        # alone means a process died (killed, out of memory), which a retry may fix.
        raise StageFailed(f"{stage} {pipeline} under torchrun failed (exit code {code}); see the log above")


def resolve_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RatchetError("train.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    if preference != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@contextmanager
def distributed(device_preference: str = "auto") -> Iterator[DistInfo]:
    """Join the process group torchrun set up (or run alone); always leave it on exit."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    try:
        yield DistInfo(rank, local_rank, world_size, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes (a no-op alone)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: object) -> list:
    """Every process's `obj`, in rank order (just `[obj]` alone)."""
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every process."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span the global batch over all processes.

    torch's SyncBatchNorm runs on CUDA only; this one runs on any backend (gloo on CPU), so
    N processes with batch B/N compute exactly what one process computes with batch B.
    The all-reduces are differentiable, so gradients flow through the shared statistics.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {x.dim()}-D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized():
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = differentiable_all_reduce(x.new_tensor([x.numel() / x.shape[1]]))
        mean = differentiable_all_reduce(x.sum(dims)) / count
        centred = x - mean.view(shape)
        var = differentiable_all_reduce((centred * centred).sum(dims)) / count  # biased, as BatchNorm uses
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        out = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace BatchNorm layers with ones that share statistics across processes."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            sync_batchnorm(child, device)
    return module
