"""The training loop every family uses: `_run_batch`, `_run_epoch`, `_validate`,
`_save_checkpoint`, `fit` (the shape of pytorch/examples' DDP Trainer).

Model, optimizer, scheduler, loss and loaders are passed in; the trainer knows nothing of
MLflow or files beyond its checkpoint. Per-epoch records go to `on_epoch_end` (rank 0 logs
them). Losses and metrics are reduced over all processes before anyone sees them.

Batches are structured (train/batch.py): `(inputs, targets)`, each a tensor or a tuple/dict of
tensors, so a model may take several inputs and predict several heads. A loss may return
`(total, {head: loss})`: the total is minimised, and every part is logged per epoch as
`train_loss_<head>` and `val_loss_<head>`. Validation metrics may be one collection, or one
per head (torchmetrics' `MultitaskWrapper`), logged as `val_<head>_<metric>`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from ratchet.lazy_imports import defer_torchmetrics

defer_torchmetrics()  # before torchmetrics' first import: only the metrics used are loaded
from torchmetrics.collections import MetricCollection
from tqdm.auto import tqdm

from ratchet.config import TrainConfig, monitor_mode
from ratchet.errors import RatchetError
from ratchet.train.batch import batch_size, flatten_metrics, split_loss, tree_map
from ratchet.train.checkpoint import save_checkpoint
from ratchet.train.distributed import DistInfo, all_gather_objects, all_reduce_sum
from ratchet.train.early_stopping import EarlyStopping
from ratchet.train.loader import BatchLoader
from ratchet.train.optim import step_scheduler

PROGRESS_DELAY_S = (2.0, 30.0)  # an epoch's bar appears after this long: on a terminal, in a log
TIMING = "epoch_seconds"  # the one wall-time entry of an epoch's record (s, training and validation)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        loss_fn: nn.Module,
        train_loader: BatchLoader,
        val_loader: BatchLoader,
        val_metrics: MetricCollection,
        dist: DistInfo,
        cfg: TrainConfig,
        *,
        checkpoint_path: Path | None = None,
        checkpoint_extra: dict | None = None,
        on_epoch_end: Callable[[dict], None] | None = None,
    ):
        self.module = model  # unwrapped: validation, checkpoints and the saved model use it
        self.model = DistributedDataParallel(model) if dist.distributed else model
        self.optimizer, self.scheduler, self.loss_fn = optimizer, scheduler, loss_fn
        self.train_loader, self.val_loader, self.val_metrics = train_loader, val_loader, val_metrics
        self.dist, self.cfg = dist, cfg
        self.checkpoint_path, self.checkpoint_extra = checkpoint_path, checkpoint_extra or {}
        self.on_epoch_end = on_epoch_end
        self.mode = monitor_mode(cfg.monitor)
        self.stopper = EarlyStopping(cfg.early_stopping.patience, cfg.early_stopping.min_delta, self.mode)
        self.amp = cfg.amp and dist.device.type == "cuda"
        self.grad_clip = cfg.grad_clip
        self.epochs_done = 0
        self.history: list[dict] = []
        self.last_pass_s: float | None = None  # the last training pass's seconds (progress bars)

    def _autocast(self):
        """bf16 autocast on CUDA when amp is on; nothing otherwise (not even a disabled context)."""
        if self.amp:
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _run_batch(self, inputs, targets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Without amp no context at all: a null one per step (with the bookkeeping since removed)
        # was ~1.5% of a small MLP's step (benchmarks/bench_tabular.py).
        if self.amp:
            with self._autocast():
                out = self.loss_fn(self.model(inputs), targets)
        else:
            out = self.loss_fn(self.model(inputs), targets)
        loss, parts = split_loss(out)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        return loss.detach(), {name: part.detach() for name, part in parts.items()} if parts else parts

    def _run_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over this process's shard; the mean training loss (and its parts) over all
        processes, each batch weighted by its number of samples."""
        self.model.train()
        for name in self.cfg.freeze:  # frozen layers keep their BatchNorm statistics too
            self.module.get_submodule(name).eval()
        self.train_loader.set_epoch(epoch)
        started = time.perf_counter()
        batches = _with_progress(self.train_loader, f"epoch {epoch + 1}", show=self.dist.is_main,
                                 last_epoch_s=self.last_pass_s)
        losses: list[torch.Tensor] = []  # per batch, on the device: no host sync per step
        parts: dict[str, torch.Tensor] = {}
        part_losses: list[torch.Tensor] = []  # several heads: per batch each head's loss
        for inputs, targets in batches:
            loss, parts = self._run_batch(inputs, targets)
            losses.append(loss)
            if parts:
                part_losses.extend(parts.values())
        names = list(parts)
        # One read from the device per epoch, then the means weighted by batch size in Python
        # floats: per step nothing but the step and an append (tensor arithmetic here, a matmul
        # and cat per epoch, and per-step bookkeeping cost 2-3% of a small MLP's epoch against
        # a plain loop: benchmarks/bench_tabular.py).
        rows = [torch.stack(losses).tolist()]  # per loss (total, then each head's), per batch
        if names:
            rows += torch.stack(part_losses).view(len(losses), len(names)).t().tolist()
        sizes = self.train_loader.batch_sizes()
        sums = [math.fsum(n * value for n, value in zip(sizes, row)) for row in rows]
        total = all_reduce_sum(torch.tensor([*sums, sum(sizes)], dtype=torch.float64, device=self.dist.device))
        *sums, count = total.tolist()
        means = [value / count for value in sums]
        self.last_pass_s = time.perf_counter() - started
        loss = means[0]
        if not math.isfinite(loss):
            raise RatchetError(f"training loss is {loss} in epoch {epoch + 1}: the model diverged "
                               "(lower train.optimizer.lr, set train.grad_clip, or check the data for NaN)")
        return {"train_loss": loss, **{f"train_loss_{name}": value for name, value in zip(names, means[1:])}}

    @torch.no_grad()
    def _validate(self) -> dict[str, float]:
        """Validation loss and metrics over the whole split, each sample counted once."""
        self.module.eval()
        self.val_metrics.reset()
        sums: torch.Tensor | None = None  # [total, *parts] x samples, then the sample count
        names: list[str] = []
        for inputs, targets in self.val_loader:
            with self._autocast():
                outputs = tree_map(lambda t: t.float(), self.module(inputs))
            loss, parts = split_loss(self.loss_fn(outputs, targets))
            names, n = list(parts), batch_size(targets)
            batch = torch.stack([loss.float() * n, *(p.float() * n for p in parts.values()),
                                 torch.tensor(float(n), device=self.dist.device)])
            sums = batch if sums is None else sums + batch
            self.val_metrics.update(outputs, targets)
        if sums is None:  # this process drew no validation sample (fewer samples than processes)
            sums = torch.zeros(2, device=self.dist.device)
        all_reduce_sum(sums)
        means = (sums[:-1] / sums[-1]).tolist()
        values = flatten_metrics(self.val_metrics.compute(), "val_")
        return {"val_loss": means[0], **{f"val_loss_{name}": v for name, v in zip(names, means[1:])}, **values}

    def _save_checkpoint(self) -> None:
        """Every process contributes its RNG state; rank 0 writes the file."""
        rng = all_gather_objects(
            {"cpu": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(self.dist.device) if self.dist.device.type == "cuda" else None}
        )
        if self.checkpoint_path is None or not self.dist.is_main:
            return
        state = {
            "epoch": self.epochs_done,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "early_stopping": self.stopper.state_dict(),
            "history": self.history,
            "rng": rng,
            **self.checkpoint_extra,
        }
        save_checkpoint(self.checkpoint_path, state)

    def resume(self, state: dict) -> None:
        """Continue from a checkpoint of this same configuration."""
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.stopper.load_state_dict(state["early_stopping"])
        self.history = list(state["history"])
        self.epochs_done = state["epoch"]
        if len(state["rng"]) == self.dist.world_size:  # same process count: exact continuation
            own = state["rng"][self.dist.rank]
            torch.set_rng_state(own["cpu"])
            if own["cuda"] is not None and self.dist.device.type == "cuda":
                torch.cuda.set_rng_state(own["cuda"], self.dist.device)

    def fit(self) -> dict:
        """Train until `epochs` or early stopping; leave the best weights in the model.

        Returns the best epoch's validation metrics, plus `best_epoch` and `epochs`.
        """
        stop = self.stopper.patience is not None and self.stopper.bad_epochs >= self.stopper.patience
        for epoch in range(self.epochs_done, self.cfg.epochs):
            if stop:
                break
            started = time.perf_counter()
            record = {"epoch": epoch + 1, **self._run_epoch(epoch), **self._validate(),
                      "lr": self.optimizer.param_groups[0]["lr"]}
            step_scheduler(self.scheduler, record[self.cfg.monitor])
            stop = self.stopper.step(record[self.cfg.monitor], self.module, epoch + 1)
            record[TIMING] = time.perf_counter() - started
            self.history.append(record)
            self.epochs_done = epoch + 1
            self._save_checkpoint()  # first: a kill after it resumes past this epoch, whose record it holds
            if self.on_epoch_end is not None and self.dist.is_main:
                self.on_epoch_end(record)
            if self.dist.is_main:
                print(_epoch_line(record, self.cfg.epochs), flush=True)
        self.stopper.restore_best(self.module)
        best = self.history[self.stopper.best_epoch - 1]
        return {"best_epoch": self.stopper.best_epoch, "epochs": self.epochs_done,
                **{k: v for k, v in best.items() if k.startswith("val_")}}


def _with_progress(loader: BatchLoader, desc: str, show: bool, last_epoch_s: float | None):
    """The loader's batches, with a tqdm bar once the epoch has run for a while (2 s on a
    terminal, 30 s in a log): short epochs stay one log line each. The bar is made only then,
    not every epoch with a delay (making one cost ~3% of a 5 ms epoch), and an epoch is watched
    only when it may get there: the first, and those after an epoch of over a tenth of the delay.
    Watching every batch of short epochs cost ~1% of them (benchmarks/bench_tabular.py)."""
    tty = sys.stderr.isatty()
    delay = PROGRESS_DELAY_S[0 if tty else 1]
    if not show or (last_epoch_s is not None and last_epoch_s < delay / 10):
        return loader
    return _watched(loader, desc, delay, tty)


def _watched(loader: BatchLoader, desc: str, delay: float, tty: bool):
    started, bar = time.monotonic(), None
    try:
        for done, batch in enumerate(loader, 1):
            yield batch
            if bar is not None:
                bar.update()
            elif time.monotonic() - started >= delay:
                bar = tqdm(total=len(loader), initial=done, desc=desc, leave=False, unit="batch",
                           mininterval=0.1 if tty else 30)
    finally:
        if bar is not None:
            bar.close()


def _epoch_line(record: dict, epochs: int) -> str:
    values = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith(("train_", "val_")))
    return f"epoch {record['epoch']:>3}/{epochs}  {values}  lr {record['lr']:.2e}  ({record[TIMING]:.2f} s)"
