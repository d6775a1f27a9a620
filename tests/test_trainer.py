"""Trainer pieces: best-weight restore, clipping, optimizers, schedulers, atomic checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ratchet.config import MLPConfig, OptimizerConfig, SchedulerConfig, TrainConfig
from ratchet.errors import RatchetError
from ratchet.evaluate.metrics import validation_metrics
from ratchet.models.mlp import MLP
from ratchet.train.checkpoint import load_checkpoint, save_checkpoint
from ratchet.train.distributed import DistInfo
from ratchet.train.early_stopping import EarlyStopping
from ratchet.train.loader import BatchLoader
from ratchet.train.optim import build_optimizer, build_scheduler, step_scheduler
from ratchet.train.trainer import Trainer

ALONE = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def train_cfg(tmp_path, **changes) -> TrainConfig:
    base = {"out_dir": tmp_path / "out", "checkpoint": tmp_path / "ckpt.pt", "epochs": 6, "batch_size": 16,
            "device": "cpu", "early_stopping": {"patience": None}}
    return TrainConfig.model_validate({**base, **changes})


def blobs(n=96, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, d, generator=g) + y[:, None] * 2.0
    return x, y


def make_trainer(cfg: TrainConfig, model: nn.Module | None = None, val=None) -> Trainer:
    torch.manual_seed(0)
    model = model or MLP(4, 2, MLPConfig(hidden=[8], batchnorm=False))
    x, y = blobs()
    vx, vy = val or blobs(48, seed=1)
    optimizer = build_optimizer(cfg.optimizer, model)
    return Trainer(model, optimizer, build_scheduler(cfg.scheduler, optimizer, cfg.epochs, "min"),
                   nn.CrossEntropyLoss(), BatchLoader([x, y], cfg.batch_size, ALONE, train=True, seed=0),
                   BatchLoader([vx, vy], 64, ALONE, train=False), validation_metrics(2, ALONE.device), ALONE, cfg,
                   checkpoint_path=cfg.checkpoint)


def test_best_state_is_a_copy_not_live_references():
    model = nn.Linear(2, 2)
    stopper = EarlyStopping(patience=2, min_delta=0, mode="min")
    stopper.step(1.0, model, epoch=1)
    best = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(5.0)  # what an optimizer step does in place
    stopper.step(2.0, model, epoch=2)  # worse: the best state must still be epoch 1's
    stopper.restore_best(model)
    assert torch.equal(model.weight, best["weight"])


def test_early_stopping_stops_after_patience_and_restores_best_weights(tmp_path):
    # A learning rate far too high makes validation loss climb after the first epochs.
    cfg = train_cfg(tmp_path, epochs=30, optimizer={"name": "sgd", "lr": 5.0, "momentum": 0.9},
                    early_stopping={"patience": 2})
    trainer = make_trainer(cfg)
    result = trainer.fit()
    assert result["epochs"] < 30
    assert result["epochs"] == result["best_epoch"] + 2
    best = trainer.history[result["best_epoch"] - 1]
    assert best["val_loss"] == min(r["val_loss"] for r in trainer.history)
    assert trainer._validate()["val_loss"] == pytest.approx(best["val_loss"], rel=1e-5)


def test_gradient_clipping_bounds_the_update(tmp_path):
    cfg = train_cfg(tmp_path, optimizer={"name": "sgd", "lr": 1.0, "momentum": 0.0}, grad_clip=0.01)
    trainer = make_trainer(cfg)
    before = torch.cat([p.detach().flatten().clone() for p in trainer.module.parameters()])
    x, y = blobs(16)
    trainer._run_batch(x, y)
    after = torch.cat([p.detach().flatten() for p in trainer.module.parameters()])
    assert (after - before).norm().item() == pytest.approx(0.01, rel=1e-4)  # lr 1: update = clipped gradient


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop", "adagrad"])
def test_every_optimizer_reduces_the_training_loss(tmp_path, name):
    lr = {"sgd": 0.1, "adagrad": 0.1, "rmsprop": 0.001}.get(name, 0.01)
    trainer = make_trainer(train_cfg(tmp_path, epochs=5, optimizer={"name": name, "lr": lr}))
    trainer.fit()
    assert trainer.history[-1]["train_loss"] < trainer.history[0]["train_loss"]


def test_plateau_scheduler_lowers_the_rate_when_the_monitor_stalls():
    opt = build_optimizer(OptimizerConfig(name="sgd", lr=1.0), nn.Linear(1, 1))
    sched = build_scheduler(SchedulerConfig(name="plateau", factor=0.5, patience=1), opt, 10, "min")
    for value in (1.0, 1.0, 1.0):
        opt.step()
        step_scheduler(sched, value)
    assert opt.param_groups[0]["lr"] == 0.5


def test_step_scheduler_decays_every_step_size_epochs():
    opt = build_optimizer(OptimizerConfig(name="sgd", lr=1.0), nn.Linear(1, 1))
    sched = build_scheduler(SchedulerConfig(name="step", step_size=2, gamma=0.1), opt, 10, "min")
    rates = []
    for _ in range(4):
        opt.step()
        step_scheduler(sched, 0.0)
        rates.append(opt.param_groups[0]["lr"])
    assert rates == pytest.approx([1.0, 0.1, 0.1, 0.01])


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"epoch": 2, "bad": Unsaveable()})
    assert load_checkpoint(path)["epoch"] == 1  # the previous checkpoint survives intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left


def test_checkpoint_describes_itself_and_loads_with_weights_only(tmp_path):
    cfg = train_cfg(tmp_path, epochs=2)
    trainer = make_trainer(cfg)
    trainer.checkpoint_extra = {"config_hash": "abc", "run_id": "r1"}
    trainer.fit()
    state = load_checkpoint(cfg.checkpoint)  # weights_only=True inside
    assert state["epoch"] == 2 and state["run_id"] == "r1" and len(state["history"]) == 2
    assert set(state) >= {"model", "optimizer", "scheduler", "early_stopping", "rng"}


def test_a_diverged_loss_stops_training_with_a_clear_error(tmp_path):
    cfg = train_cfg(tmp_path, epochs=3)
    trainer = make_trainer(cfg)
    trainer.train_loader.tensors[0][5, 2] = float("nan")  # one bad value poisons the loss
    with pytest.raises(RatchetError, match="training loss is nan in epoch 1: the model diverged"):
        trainer.fit()


def test_a_long_epoch_shows_a_progress_bar_and_short_ones_are_not_watched(tmp_path, monkeypatch, capsys):
    """Work that runs for a while shows progress (a tqdm bar after the delay), and a run of
    short epochs pays nothing per batch for it: after an epoch under a tenth of the delay, the
    next one iterates the loader itself."""
    import time

    from ratchet.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "PROGRESS_DELAY_S", (0.05, 0.05))
    trainer = make_trainer(train_cfg(tmp_path, epochs=2))
    trainer.train_loader.transform = lambda x: (time.sleep(0.02), x)[1]  # 6 batches: ~0.12 s an epoch
    trainer.fit()
    err = capsys.readouterr().err
    assert "epoch 1: " in err and "epoch 2: " in err and "batch" in err, err

    loader = trainer.train_loader
    assert trainer_module._with_progress(loader, "epoch 3", True, last_epoch_s=0.001) is loader
    assert trainer_module._with_progress(loader, "epoch 3", True, last_epoch_s=None) is not loader
    assert trainer_module._with_progress(loader, "epoch 3", False, last_epoch_s=None) is loader  # rank > 0
