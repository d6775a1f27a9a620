"""Structured batches: several inputs and several heads through the loader and the Trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics import MetricCollection, MultitaskWrapper
from torchmetrics.classification import MulticlassAccuracy

from ratchet.config import TrainConfig
from ratchet.train.distributed import DistInfo
from ratchet.train.loader import BatchLoader
from ratchet.train.trainer import Trainer

ALONE = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
WEIGHTS = {"group": 0.3, "class": 1.0}


def two_head_data(n: int, seed: int):
    """inputs {image (n,1,4,4), group one-hot (n,3)}, targets {group, class}: learnable."""
    g = torch.Generator().manual_seed(seed)
    group = torch.randint(0, 3, (n,), generator=g)
    cls = (group * 2 + torch.randint(0, 2, (n,), generator=g))  # 6 classes, 2 per group
    image = torch.randn(n, 1, 4, 4, generator=g) + cls.view(n, 1, 1, 1).float()
    return {"image": image, "group": nn.functional.one_hot(group, 3).float()}, {"group": group, "class": cls}


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ELU())
        self.group_in = nn.Linear(3, 4)
        self.heads = nn.ModuleDict({"group": nn.Linear(8, 3), "class": nn.Linear(12, 6)})

    def forward(self, x: dict) -> dict:
        h = self.image(x["image"])
        return {"group": self.heads["group"](h),
                "class": self.heads["class"](torch.cat([h, self.group_in(x["group"])], dim=1))}


def weighted_loss(outputs: dict, targets: dict):
    parts = {head: nn.functional.cross_entropy(outputs[head], targets[head]) for head in WEIGHTS}
    return sum(WEIGHTS[h] * parts[h] for h in WEIGHTS), parts


def test_every_leaf_of_a_batch_is_gathered_by_the_same_indices_preloaded_or_streamed():
    n = 37
    rows = np.arange(n)
    samples = ({"a": rows.astype(np.float32)[:, None] * [1, 1], "b": (rows * 10).astype(np.int64)},
               (rows.astype(np.int64), {"c": -rows.astype(np.float64)}))
    for budget in (None, 0):  # preloaded tensors; memory-mapped-style streaming
        loader = BatchLoader(samples, 8, ALONE, train=True, seed=3, preload_bytes=budget)
        assert loader.streaming == (budget == 0)
        loader.set_epoch(1)
        seen = []
        for idx, (inputs, targets) in loader.iter_with_indices():
            assert set(inputs) == {"a", "b"} and isinstance(targets, tuple) and set(targets[1]) == {"c"}
            assert torch.equal(inputs["a"][:, 0].long(), idx) and torch.equal(inputs["b"], idx * 10)
            assert torch.equal(targets[0], idx) and torch.equal(targets[1]["c"], -idx.double())
            seen += idx.tolist()
        assert sorted(seen) == list(range(n))
    with pytest.raises(ValueError, match="unequal length"):
        BatchLoader(({"a": rows}, rows[:-1]), 8, ALONE, train=False)


def test_trainer_takes_several_inputs_and_heads_and_logs_each_loss_part(tmp_path):
    cfg = TrainConfig.model_validate({"out_dir": tmp_path, "checkpoint": tmp_path / "c.pt", "epochs": 3,
                                      "batch_size": 16, "device": "cpu", "early_stopping": {"patience": None}})
    torch.manual_seed(0)
    model = TwoHeads()
    train_x, train_y = two_head_data(96, seed=0)
    val_x, val_y = two_head_data(50, seed=1)  # 50: batches of 16, 16, 16 and 2 (uneven)
    metrics = MultitaskWrapper({"group": MetricCollection({"accuracy": MulticlassAccuracy(3, average="micro")}),
                                "class": MetricCollection({"accuracy": MulticlassAccuracy(6, average="micro")})})
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=0.02), None, weighted_loss,
                      BatchLoader((train_x, train_y), cfg.batch_size, ALONE, train=True, seed=0),
                      BatchLoader((val_x, val_y), 16, ALONE, train=False), metrics, ALONE, cfg)
    best = trainer.fit()

    first, last = trainer.history[0], trainer.history[-1]
    assert {"train_loss_group", "train_loss_class", "val_loss_group", "val_loss_class",
            "val_group_accuracy", "val_class_accuracy"} <= set(last)
    for record in trainer.history:  # the total is the weighted sum of the parts, per epoch
        for split in ("train", "val"):
            assert record[f"{split}_loss"] == pytest.approx(
                sum(WEIGHTS[h] * record[f"{split}_loss_{h}"] for h in WEIGHTS), rel=1e-5)
    assert last["train_loss"] < first["train_loss"]
    assert best["best_epoch"] >= 1

    # Validation loss is a per-sample mean: batches weighted by their number of samples (the
    # first target's length), not by how many heads a batch has.
    trainer.stopper.restore_best(model)
    model.eval()
    with torch.no_grad():
        total, parts = weighted_loss(model(val_x), val_y)
    best_record = trainer.history[best["best_epoch"] - 1]
    assert best_record["val_loss"] == pytest.approx(total.item(), rel=1e-5)
    assert best_record["val_loss_class"] == pytest.approx(parts["class"].item(), rel=1e-5)
    with torch.no_grad():
        accuracy = (model(val_x)["class"].argmax(1) == val_y["class"]).float().mean().item()
    assert best_record["val_class_accuracy"] == pytest.approx(accuracy)


def test_the_training_loss_of_an_epoch_is_a_per_sample_mean_over_uneven_batches(tmp_path):
    """train_loss and each head's part are means over samples: batches of 16, 16, 16 and 2
    weighted by their sizes (a mean of the four batch means would weigh the last two samples
    as much as 16). The step leaves the weights as they were (lr 1e-30), so the epoch's loss must
    equal the loss of the whole split in one pass."""
    cfg = TrainConfig.model_validate({"out_dir": tmp_path, "checkpoint": tmp_path / "c.pt", "epochs": 1,
                                      "batch_size": 16, "device": "cpu", "early_stopping": {"patience": None}})
    torch.manual_seed(0)
    model = TwoHeads()
    x, y = two_head_data(50, seed=0)
    metrics = MultitaskWrapper({"class": MetricCollection({"accuracy": MulticlassAccuracy(6, average="micro")})})
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=1e-30), None, weighted_loss,
                      BatchLoader((x, y), cfg.batch_size, ALONE, train=True, seed=0),
                      BatchLoader((x, y), 64, ALONE, train=False), metrics, ALONE, cfg)
    assert trainer.train_loader.batch_sizes() == [16, 16, 16, 2]
    record = trainer._run_epoch(0)
    with torch.no_grad():
        total, parts = weighted_loss(model(x), y)
    assert record["train_loss"] == pytest.approx(total.item(), rel=1e-6)
    for head in WEIGHTS:
        assert record[f"train_loss_{head}"] == pytest.approx(parts[head].item(), rel=1e-6)
