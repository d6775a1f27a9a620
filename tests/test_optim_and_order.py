"""The optimizer params.yaml names is the one built; training order reshuffles every epoch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from ratchet.config import OptimizerConfig, TrainConfig
from ratchet.evaluate.metrics import validation_metrics
from ratchet.train.distributed import DistInfo
from ratchet.train.loader import BatchLoader, ShuffledSampler
from ratchet.train.optim import build_optimizer
from ratchet.train.trainer import Trainer

CPU = torch.device("cpu")
ALONE = DistInfo(rank=0, local_rank=0, world_size=1, device=CPU)

# What each name must build, with the config's momentum where the algorithm takes one.
LR, WEIGHT_DECAY, MOMENTUM = 0.05, 0.1, 0.5
REFERENCE = {
    "sgd": (torch.optim.SGD, {"momentum": MOMENTUM}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "rmsprop": (torch.optim.RMSprop, {"momentum": MOMENTUM}),
    "adagrad": (torch.optim.Adagrad, {}),
}


def tiny_model() -> nn.Sequential:
    """Two layers with fixed weights; the first is frozen (as `train.freeze` leaves it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    return model


def three_steps(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.Tensor:
    """Three steps with the same fixed, different-each-step gradients; the weights after them."""
    g = torch.Generator().manual_seed(1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for _ in range(3):
        for p in trainable:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", list(REFERENCE))
def test_build_optimizer_builds_the_named_algorithm_with_the_configured_settings(name):
    """Each name builds its own torch.optim class over the trainable parameters only, with lr,
    weight_decay and (sgd, rmsprop) momentum from the config."""
    model = tiny_model()
    optimizer = build_optimizer(
        OptimizerConfig(name=name, lr=LR, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM), model
    )
    cls, extra = REFERENCE[name]
    assert type(optimizer) is cls  # exact: AdamW may subclass Adam
    (group,) = optimizer.param_groups
    assert group["lr"] == LR and group["weight_decay"] == WEIGHT_DECAY
    for key, value in extra.items():
        assert group[key] == value
    assert {id(p) for p in group["params"]} == {id(p) for p in model[1].parameters()}  # frozen layer left out


@pytest.mark.parametrize("name", list(REFERENCE))
def test_build_optimizer_updates_like_the_named_torch_optimizer_and_unlike_the_others(name):
    """Three steps of the built optimizer move the weights as torch's own class built with the
    same arguments does, and measurably differently from each of the other four algorithms
    (e.g. AdamW's decoupled weight decay against Adam's L2 penalty)."""
    cfg = OptimizerConfig(name=name, lr=LR, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM)
    model = tiny_model()
    frozen = model[0].weight.detach().clone()
    built = three_steps(build_optimizer(cfg, model), model)
    assert torch.equal(model[0].weight, frozen)

    references = {}
    for other, (cls, extra) in REFERENCE.items():
        ref_model = tiny_model()
        params = [p for p in ref_model.parameters() if p.requires_grad]
        references[other] = three_steps(cls(params, lr=LR, weight_decay=WEIGHT_DECAY, **extra), ref_model)
    torch.testing.assert_close(built, references[name])
    for other, weights in references.items():
        if other != name:
            assert (built - weights).abs().max() > 1e-3, f"{name} updates the weights as {other} does"


def epoch_orders(loader: BatchLoader, epochs) -> list[list[int]]:
    """The sample order the loader's batches follow in each epoch (the data is the index)."""
    orders = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        orders.append([int(i) for indices, _ in loader for i in indices])
    return orders


def index_loader(n: int, dist: DistInfo, *, train: bool = True, seed: int = 3) -> BatchLoader:
    return BatchLoader([torch.arange(n), torch.zeros(n, dtype=torch.long)], 4, dist, train=train, seed=seed)


def test_training_order_changes_every_epoch_and_repeats_for_the_same_seed_and_epoch():
    """set_epoch reshuffles: each epoch is a new permutation of all samples, and the same
    (seed, epoch) gives the same order again, in the same or a new loader."""
    n = 24
    loader = index_loader(n, ALONE)
    first = epoch_orders(loader, [0, 1, 2])
    for order in first:
        assert sorted(order) == list(range(n))
    assert first[0] != first[1] and first[1] != first[2] and first[0] != first[2]
    assert epoch_orders(loader, [1, 0]) == [first[1], first[0]]
    assert epoch_orders(index_loader(n, ALONE), [2, 0, 1]) == [first[2], first[0], first[1]]
    assert epoch_orders(index_loader(n, ALONE, seed=4), [0]) != [first[0]]


@pytest.mark.parametrize("n, world", [(24, 1), (23, 2), (7, 3), (2, 5)])  # (2, 5): padding longer than the data
def test_training_order_is_torchs_distributed_sampler_order_as_one_tensor(n, world):
    """The loader's sampler computes DistributedSampler's order with tensor ops: the same indices,
    padding included, for every rank and epoch."""
    for rank in range(world):
        ours = ShuffledSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=3)
        torchs = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=3)
        for epoch in (0, 1, 5):
            ours.set_epoch(epoch)
            torchs.set_epoch(epoch)
            assert ours.order().tolist() == list(torchs) == list(ours)


@pytest.mark.parametrize("n, batch, world", [(24, 4, 1), (25, 4, 1), (23, 4, 2), (10, 3, 3), (2, 4, 5)])
@pytest.mark.parametrize("kind", ["train", "balanced", "evaluate"])
def test_batch_sizes_are_the_sizes_of_the_batches_each_process_gets(n, batch, world, kind):
    """What the Trainer weights each batch's loss by: the batches' real sizes, for every rank, with
    padding, a balanced draw, the last batch of one left out (25 = 6 x 4 + 1) or an uneven last."""
    for rank in range(world):
        dist = DistInfo(rank=rank, local_rank=rank, world_size=world, device=CPU)
        weights = torch.ones(n).numpy() if kind == "balanced" else None
        loader = BatchLoader([torch.arange(n), torch.zeros(n)], batch, dist, train=kind != "evaluate", seed=1,
                             weights=weights)
        loader.set_epoch(2)
        assert loader.batch_sizes() == [len(indices) for indices, _ in loader], (rank, kind)
        assert len(loader.batch_sizes()) == len(loader)


def test_two_processes_shards_cover_every_sample_each_epoch():
    """Rank 0 and rank 1 of two take the same number of batches and between them every sample,
    every epoch (padded with repeats when the count is odd); in evaluation each sample once."""
    n = 23
    ranks = [DistInfo(rank=r, local_rank=r, world_size=2, device=CPU) for r in (0, 1)]
    train = [epoch_orders(index_loader(n, dist), [0, 1, 2]) for dist in ranks]
    for epoch in range(3):
        shard0, shard1 = train[0][epoch], train[1][epoch]
        assert len(shard0) == len(shard1) == 12
        assert set(shard0) | set(shard1) == set(range(n))
    assert train[0][0] != train[0][1]  # each shard reshuffles too

    evaluation = [epoch_orders(index_loader(n, dist, train=False), [0])[0] for dist in ranks]
    assert sorted(evaluation[0] + evaluation[1]) == list(range(n))


class Recorder(nn.Module):
    """A linear classifier of one feature (the sample's index) that notes the indices it trains on."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(1, 2)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen += [int(i) for i in x[:, 0]]
        return self.linear(x / self.n)


def test_trainer_reshuffles_the_training_order_every_epoch(tmp_path):
    """fit() calls the train loader's set_epoch each epoch: epochs 1, 2 and 3 see all samples in
    three different orders."""
    n = 24
    cfg = TrainConfig.model_validate({
        "out_dir": tmp_path / "out", "checkpoint": tmp_path / "ckpt.pt", "epochs": 3, "batch_size": 8,
        "device": "cpu", "optimizer": {"name": "sgd", "lr": 0.01}, "early_stopping": {"patience": None},
    })
    x, y = torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n) % 2
    model = Recorder(n)
    orders: list[list[int]] = []

    def end_of_epoch(record: dict) -> None:
        orders.append(model.seen)
        model.seen = []

    optimizer = build_optimizer(cfg.optimizer, model)
    trainer = Trainer(model, optimizer, None, nn.CrossEntropyLoss(),
                      BatchLoader([x, y], cfg.batch_size, ALONE, train=True, seed=0),
                      BatchLoader([x, y], 64, ALONE, train=False), validation_metrics(2, CPU), ALONE, cfg,
                      on_epoch_end=end_of_epoch)
    trainer.fit()
    assert len(orders) == 3
    for order in orders:
        assert sorted(order) == list(range(n))
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
