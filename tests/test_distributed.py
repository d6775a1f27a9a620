"""DDP on CPU with real gloo process groups: two processes compute what one process computes."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from ratchet.config import MLPConfig, TrainConfig
from ratchet.evaluate.metrics import validation_metrics
from ratchet.models.mlp import MLP
from ratchet.train.distributed import DistInfo, distributed, sync_batchnorm
from ratchet.train.loader import BatchLoader
from ratchet.train.optim import build_optimizer
from ratchet.train.trainer import Trainer

ROWS, FEATURES, CLASSES, GLOBAL_BATCH = 256, 5, 3, 64  # 4 steps an epoch, no padding


def data():
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, CLASSES, (ROWS,), generator=g)
    x = torch.randn(ROWS, FEATURES, generator=g) + y[:, None].float()
    return x, y


def fit(dist: DistInfo, sync_bn: bool) -> tuple[dict, list[dict]]:
    """Two epochs of the real Trainer (BatchNorm on, momentum SGD); final weights and history."""
    cfg = TrainConfig.model_validate({
        "out_dir": "unused", "checkpoint": "unused", "epochs": 2, "batch_size": GLOBAL_BATCH, "device": "cpu",
        "nproc": dist.world_size, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "early_stopping": {"patience": None}, "monitor": "val_accuracy",
    })
    torch.manual_seed(0)
    model = MLP(FEATURES, CLASSES, MLPConfig(hidden=[16, 8], batchnorm=True, dropout=0.0))
    if dist.distributed and sync_bn:
        model = sync_batchnorm(model, dist.device)
    x, y = data()
    trainer = Trainer(model, build_optimizer(cfg.optimizer, model), None, nn.CrossEntropyLoss(),
                      BatchLoader([x, y], GLOBAL_BATCH // dist.world_size, dist, train=True, seed=11),
                      BatchLoader([x[:101], y[:101]], 16, dist, train=False),  # 101: uneven shards
                      validation_metrics(CLASSES, dist.device), dist, cfg)
    for epoch in range(cfg.epochs):  # the epoch loop of fit(), without restoring a best epoch
        trainer._run_epoch(epoch)
        trainer.history.append(trainer._validate())
    return {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}, trainer.history


def _worker(rank: int, world: int, port: int, sync_bn: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    with distributed("cpu") as dist:
        assert torch.distributed.get_backend() == "gloo"
        state, history = fit(dist, sync_bn)
        if dist.is_main:
            torch.save({"state": state, "history": history}, out)


def run_two_processes(tmp_path, sync_bn: bool) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / f"two-{sync_bn}.pt")
    mp.spawn(_worker, args=(2, port, sync_bn, out), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_two_gloo_processes_update_parameters_exactly_like_one(tmp_path):
    torch.manual_seed(0)
    initial = MLP(FEATURES, CLASSES, MLPConfig(hidden=[16, 8], batchnorm=True, dropout=0.0)).state_dict()
    one_state, one_history = fit(DistInfo(0, 0, 1, torch.device("cpu")), sync_bn=True)
    two = run_two_processes(tmp_path, sync_bn=True)

    assert not torch.allclose(one_state["1.weight"], initial["1.weight"])  # it did train
    for key, value in one_state.items():
        torch.testing.assert_close(two["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # Validation loss and metrics are reduced over both processes: the same numbers as alone.
    for alone, pair in zip(one_history, two["history"]):
        assert pair == pytest.approx(alone, rel=1e-5)


@pytest.mark.slow
def test_without_synchronised_batchnorm_the_processes_diverge_from_one(tmp_path):
    # The control for the test above: per-process BatchNorm statistics change the update,
    # so equality there is the work of GlobalBatchNorm, not of a test too blunt to notice.
    one_state, _ = fit(DistInfo(0, 0, 1, torch.device("cpu")), sync_bn=True)
    two = run_two_processes(tmp_path, sync_bn=False)
    assert not torch.allclose(two["state"]["1.weight"], one_state["1.weight"], atol=1e-4)
