"""On CUDA (`pytest -m gpu`; benchmarks/gpu.sh runs them on a GPU machine; skipped without one):
bf16 autocast trains to finite, sane numbers; BatchNorm under DDP on CUDA is torch's
SyncBatchNorm, with the same statistics on every rank and the one-process result; and the real
`ratchet train` over NCCL with one process per GPU ends where one process does.

The DDP tests need two GPUs or more (NCCL refuses two ranks on one device) and skip, saying
so, on a machine with one.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, load_prepared, make_csv, mlflow_client, ratchet, tiny_params, write_params
from test_distributed import CLASSES, FEATURES, GLOBAL_BATCH, data
from torch import nn

from ratchet.config import MLPConfig, TrainConfig
from ratchet.evaluate.metrics import validation_metrics
from ratchet.models.mlp import MLP
from ratchet.train.distributed import DistInfo, distributed, sync_batchnorm
from ratchet.train.loader import BatchLoader
from ratchet.train.optim import build_optimizer
from ratchet.train.trainer import Trainer

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason="needs a CUDA device")]
needs_two = pytest.mark.skipif(GPUS < 2, reason=f"NCCL DDP needs 2 or more GPUs ({GPUS} here)")
# Equal shards without padding, so that N processes see exactly one process's batches.
divides_batch = pytest.mark.skipif(GPUS > 0 and GLOBAL_BATCH % GPUS != 0,
                                   reason=f"{GPUS} GPUs do not divide the test's global batch of {GLOBAL_BATCH}")
MODEL = MLPConfig(hidden=[16, 8], batchnorm=True, dropout=0.0)


def fit_on_cuda(dist: DistInfo, amp: bool, epochs: int = 2) -> dict:
    """The real Trainer on this process's GPU (BatchNorm, momentum SGD): weights, history, and
    what its BatchNorm layers are and hold, all on the CPU."""
    cfg = TrainConfig.model_validate({
        "out_dir": "unused", "checkpoint": "unused", "epochs": epochs, "batch_size": GLOBAL_BATCH, "device": "cuda",
        "nproc": dist.world_size, "amp": amp, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "early_stopping": {"patience": None}, "monitor": "val_accuracy",
    })
    torch.manual_seed(0)
    model = MLP(FEATURES, CLASSES, MODEL)
    if dist.distributed:
        model = sync_batchnorm(model, dist.device)
    model.to(dist.device)
    x, y = data()
    trainer = Trainer(model, build_optimizer(cfg.optimizer, model), None, nn.CrossEntropyLoss(),
                      BatchLoader([x, y], GLOBAL_BATCH // dist.world_size, dist, train=True, seed=11),
                      BatchLoader([x[:101], y[:101]], 16, dist, train=False),
                      validation_metrics(CLASSES, dist.device), dist, cfg)
    dtypes: set[torch.dtype] = set()
    model[0].register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))  # the first Linear
    history = []
    for epoch in range(cfg.epochs):
        history.append({**trainer._run_epoch(epoch), **trainer._validate()})
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return {"state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, "history": history,
            "dtypes": sorted(str(d) for d in dtypes), "norm_types": sorted({type(m).__name__ for m in norms}),
            "norm_stats": [(m.running_mean.cpu(), m.running_var.cpu()) for m in norms]}


def test_bf16_autocast_trains_to_finite_sane_numbers():
    alone = DistInfo(0, 0, 1, torch.device("cuda", 0))
    amp = fit_on_cuda(alone, amp=True, epochs=4)
    full = fit_on_cuda(alone, amp=False, epochs=4)
    assert amp["dtypes"] == ["torch.bfloat16"] and full["dtypes"] == ["torch.float32"]  # autocast was on, then off
    losses = [h["train_loss"] for h in amp["history"]]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(v.dtype == full["state"][k].dtype and torch.isfinite(v.float()).all() for k, v in amp["state"].items())
    last = amp["history"][-1]
    assert 0.6 < last["val_accuracy"] <= 1.0 and 0.0 <= last["val_f1_macro"] <= 1.0  # 3 classes: chance is 1/3
    # bf16 keeps ~3 significant digits: the same training, nearly the same numbers
    assert last["train_loss"] == pytest.approx(full["history"][-1]["train_loss"], rel=0.1, abs=0.02)
    assert abs(last["val_accuracy"] - full["history"][-1]["val_accuracy"]) <= 0.1


def test_the_train_stage_on_cuda_with_amp_writes_a_sane_model(project):
    settings = {"tabular.train.device": "cuda", "tabular.train.amp": True, "tabular.model.batchnorm": True,
                "tabular.train.epochs": 6, "tabular.train.optimizer.lr": 0.01}
    write_params(project, tiny_params(**settings))
    ratchet(project, "prepare", "tabular")
    ratchet(project, "train", "tabular")
    saved = torch.load(project / "models/tabular/model.pt", weights_only=True)
    assert all(v.device.type == "cpu" and torch.isfinite(v.float()).all() for v in saved["model"].values())
    assert 0.5 < saved["metrics"]["val_accuracy"] <= 1.0  # 3 classes
    run = mlflow_client(project).get_run(json.loads((project / "models/tabular/run.json").read_text())["run_id"])
    assert run.data.params["train.amp"] == "true" and run.data.params["train.device"] == "cuda"


def test_batchnorm_on_cuda_becomes_torchs_syncbatchnorm_with_the_same_state_names():
    plain = MLP(FEATURES, CLASSES, MODEL)
    synced = sync_batchnorm(MLP(FEATURES, CLASSES, MODEL), torch.device("cuda", 0))
    norms = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is nn.SyncBatchNorm for m in norms)
    assert synced.state_dict().keys() == plain.state_dict().keys()  # saved models load into plain BatchNorm


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    with distributed("cuda") as dist:
        assert torch.distributed.get_backend() == "nccl" and dist.device == torch.device("cuda", rank)
        torch.save(fit_on_cuda(dist, amp=False), f"{out}.{rank}")


@needs_two
@divides_batch
def test_under_nccl_every_rank_holds_the_same_batchnorm_statistics_as_one_process(tmp_path):
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(GPUS, free_port(), out), nprocs=GPUS, join=True)
    ranks = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(GPUS)]
    alone = fit_on_cuda(DistInfo(0, 0, 1, torch.device("cuda", 0)), amp=False)
    for got in ranks:
        assert got["norm_types"] == ["SyncBatchNorm"]
        for (mean, var), (mean0, var0) in zip(got["norm_stats"], ranks[0]["norm_stats"]):
            torch.testing.assert_close(mean, mean0, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(var, var0, rtol=1e-6, atol=1e-7)
    # Statistics over the global batch: what one process with the whole batch computes.
    for (mean, var), (mean1, var1) in zip(ranks[0]["norm_stats"], alone["norm_stats"]):
        torch.testing.assert_close(mean, mean1, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(var, var1, rtol=1e-3, atol=1e-4)
    for key, value in alone["state"].items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-3, atol=1e-4, msg=key)
    for one, many in zip(alone["history"], ranks[0]["history"]):
        assert many == pytest.approx(one, rel=1e-3, abs=1e-4)


@needs_two
def test_ratchet_train_over_every_gpu_ends_where_one_process_does(project):
    settings = {"tabular.train.device": "cuda", "tabular.train.amp": False, "tabular.model.batchnorm": True,
                "tabular.train.batch_size": 15 * GPUS, "tabular.train.epochs": 6, "tabular.train.optimizer.lr": 0.01}
    make_csv(project / "data/raw/table.csv", rows=1200)  # 840 training rows: equal shards for 1 to 8 GPUs
    write_params(project, tiny_params(**settings))
    ratchet(project, "prepare", "tabular")
    rows = load_prepared(project / "data/prepared/tabular").meta.rows["train"]
    if rows % GPUS:
        pytest.skip(f"{GPUS} GPUs do not divide the {rows} training rows")
    ratchet(project, "train", "tabular")
    alone = torch.load(project / "models/tabular/model.pt", weights_only=True)
    write_params(project, tiny_params(**settings, **{"tabular.train.nproc": GPUS}))
    proc = ratchet(project, "train", "tabular")  # re-launches itself under torchrun: NCCL, one process per GPU
    many = torch.load(project / "models/tabular/model.pt", weights_only=True)
    assert proc.stdout.count("trained tabular:") == 1
    assert many["metrics"]["best_epoch"] == alone["metrics"]["best_epoch"]
    assert many["model"].keys() == alone["model"].keys()
    for key, value in alone["model"].items():
        torch.testing.assert_close(many["model"][key], value, rtol=1e-3, atol=1e-4, msg=key)
    run = mlflow_client(project).get_run(json.loads((project / "models/tabular/run.json").read_text())["run_id"])
    assert run.data.params["world_size"] == str(GPUS) and run.info.status == "FINISHED"
