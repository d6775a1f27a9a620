"""Train a pipeline's model: `ratchet train tabular`.

With `train.nproc` > 1 the command re-launches itself under torchrun on this machine (gloo on
CPU, NCCL on GPUs). Across nodes, start it on every node with torchrun yourself:

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 \
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \
        --rdzv-id JOB_ID --rdzv-conf is_host=IS_HOST,read_timeout=600 --max-restarts 2 \
        -m ratchet train tabular

(IS_HOST: 1 on the node HOST names, 0 elsewhere; JOB_ID: the same on every node; the variable
lets a restarted node rejoin; see README.)

Logs the run to MLflow and registers the model as a new version of `promote.registered_model`
(the promote stage then decides whether it becomes `@champion`). Before training it checks
that the champion, if any, takes the same inputs, so a new dataset under an old name fails
at once, not after the training. Writes `train.out_dir`: model.pt (the best weights,
self-describing), history.csv (one row per epoch, for `dvc plots`), curves.png and run.json
(MLflow run, logged model, registered version). While it runs, `train.checkpoint` holds the
last finished epoch; a restarted run resumes from it and continues the same MLflow run. The
checkpoint is deleted when training finishes.
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient

from ratchet.config import Params, PipelineConfig, config_hash
from ratchet.data.prepared import Prepared, check_replaceable, replace_dir, write_json
from ratchet.evaluate.plots import curves_png
from ratchet.families import Family, get_family, monitor_mode
from ratchet.stages import HISTORY_FILE, MODEL_FILE
from ratchet.models import count_parameters
from ratchet.models.finetune import freeze, load_initial_weights
from ratchet.serve.log import log_served_model
from ratchet.tracking.registry import (
    INPUT_TAG, FINGERPRINT_ARTIFACT, FINGERPRINT_FILE, champion_version, check_comparable, input_digest, register,
)
from ratchet.tracking.lineage import lineage_tags
from ratchet.tracking.runs import RUN_FILE, flatten, mark_killed, numeric, training_run, use_tracking
from ratchet.train.checkpoint import load_checkpoint
from ratchet.train.distributed import DistInfo, distributed, launch, sync_batchnorm, under_torchrun
from ratchet.train.optim import build_optimizer, build_scheduler
from ratchet.train.loader import BatchLoader
from ratchet.train.trainer import TIMING, Trainer


def run(params: Params, name: str) -> dict:
    """Train pipeline `name`; return the best epoch's validation metrics."""
    cfg = params.pipeline(name)
    family = get_family(cfg.family)
    prepared = family.load(cfg.prepare.out_dir)
    check_replaceable(cfg.train.out_dir)  # before any work: a foreign directory there stays untouched
    if cfg.train.nproc > 1 and not under_torchrun():
        _check_registry(params, cfg, family, prepared.meta)  # fail here, before any process starts
        launch(cfg.train.nproc, "train", name, str(params.file))
        return json.loads((cfg.train.out_dir / RUN_FILE).read_text())["metrics"]
    with distributed(cfg.train.device) as dist:
        return _train(params, name, cfg, family, prepared, dist)


def _train(params: Params, name: str, cfg: PipelineConfig, family: Family, prepared: Prepared,
           dist: DistInfo) -> dict:
    started = time.perf_counter()
    meta = prepared.meta
    if dist.is_main:  # rank 0 alone writes them, here too after a node's restart under torchrun
        _remove_stale_temporaries(cfg)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    net = family.new_model(cfg.model, meta)
    fresh = load_initial_weights(
        net, cfg.train.init_from, cfg.model.name, params.root,
        check=lambda saved: family.check_init_from(saved, cfg, cfg.train.init_from),
    ) if cfg.train.init_from else []
    frozen = freeze(net, cfg.train.freeze)
    if dist.distributed and cfg.train.sync_batchnorm:
        net = sync_batchnorm(net, dist.device)
    net.to(dist.device, memory_format=family.memory_format(meta))
    optimizer = build_optimizer(cfg.train.optimizer, net)
    mode = monitor_mode(cfg.train.monitor)
    scheduler = build_scheduler(cfg.train.scheduler, optimizer, cfg.train.epochs, mode)
    train_transform, eval_transform = family.transforms(cfg, meta, dist.device)
    train_loader = BatchLoader(family.samples(cfg, prepared, "train"), cfg.train.batch_size // dist.world_size, dist,
                               train=True, seed=cfg.seed, transform=train_transform,
                               weights=family.sample_weights(cfg, prepared))
    val_loader = BatchLoader(family.samples(cfg, prepared, "val"), cfg.evaluate.batch_size, dist, train=False,
                             transform=eval_transform)
    chash = config_hash(cfg.model, cfg.train.model_dump(mode="json", exclude={"out_dir", "checkpoint"}),
                        cfg.seed, meta.data_hash)
    state = _resumable(cfg.train.checkpoint, chash, dist)
    marker = _run_marker(cfg)
    torch.manual_seed(cfg.seed + dist.rank)  # dropout draws differ between processes

    if dist.is_main:
        _check_registry(params, cfg, family, meta)
        reopen = state["run_id"] if state else _unfinished_run(marker, chash)
        tags = {"ratchet.pipeline": name, "ratchet.family": cfg.family,
                **lineage_tags(params.root, meta, [cfg.prepare.out_dir])}
        run_ctx = training_run(name, params.root, run_id=reopen, tags=tags, run_name=f"{name} training",
                               system_metrics=cfg.train.system_metrics)
    else:
        run_ctx = contextlib.nullcontext()
    with run_ctx as active:
        run_id = active.info.run_id if active else None
        if active:  # before the first checkpoint: a kill from here on leaves the run findable
            write_json(marker, {"run_id": run_id, "config_hash": chash})
        if active and state is None:
            mlflow.log_params({**flatten(cfg.model_dump(mode="json")), "parameters": count_parameters(net),
                               "parameters_frozen": frozen, "world_size": dist.world_size})
            if cfg.train.init_from:
                mlflow.set_tag("ratchet.init_from", cfg.train.init_from)
                print(f"initialised from {cfg.train.init_from}; fresh: {', '.join(fresh) or 'none'}; "
                      f"{frozen} parameters frozen")
            family.on_train_start(cfg, prepared)
        loss_fn, val_metrics = family.objective(cfg, meta, dist.device)
        trainer = Trainer(
            net, optimizer, scheduler, loss_fn, train_loader, val_loader, val_metrics, dist, cfg.train,
            checkpoint_path=cfg.train.checkpoint,
            checkpoint_extra={"config_hash": chash, "config": cfg.model_dump(mode="json"), "run_id": run_id},
            on_epoch_end=lambda record: mlflow.log_metrics(numeric(record), step=record["epoch"]),
        )
        if state is not None:
            trainer.resume(state)
            if dist.is_main:
                _log_missing_epochs(run_id, trainer.history)
                print(f"resuming {name} from {cfg.train.checkpoint} after epoch {state['epoch']} (MLflow run {run_id})")
        fit_started = time.perf_counter()
        result = trainer.fit()
        fit_seconds = time.perf_counter() - fit_started
        if dist.is_main:
            _write_outputs(cfg, name, family, net, prepared, trainer.history, result, run_id,
                           {"fit_seconds": fit_seconds, "startup_seconds": fit_started - started})
    if dist.is_main:
        cfg.train.checkpoint.unlink(missing_ok=True)
        marker.unlink(missing_ok=True)
        print(f"trained {name}: best epoch {result['best_epoch']}/{result['epochs']}, "
              + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k.startswith("val_"))
              + f" -> {cfg.train.out_dir}")
    return result


def summary_metrics(result: dict) -> dict[str, float]:
    """The fit's result as run metrics: `best_epoch`, `epochs`, and each validation metric of the
    best epoch as `best_<name>` (never `best_best_epoch`)."""
    return {key if key in ("best_epoch", "epochs") else f"best_{key}": value
            for key, value in numeric(result).items()}


def _check_registry(params: Params, cfg: PipelineConfig, family: Family, meta) -> None:
    """Refuse to train a model that could not be compared with the registered champion."""
    use_tracking(params.root)
    champion = champion_version(MlflowClient(), cfg.promote.registered_model)
    if champion is not None:
        check_comparable(champion, family.input_description(cfg, meta), cfg.promote.registered_model)


def _run_marker(cfg: PipelineConfig) -> Path:
    """`<checkpoint>.run.json`: the MLflow run of an unfinished training, written when the run
    starts (before any checkpoint) and removed with the checkpoint when training finishes."""
    return cfg.train.checkpoint.with_name(cfg.train.checkpoint.name + ".run.json")


def _unfinished_run(marker: Path, chash: str) -> str | None:
    """The run of a training killed before its first checkpoint, to continue: the same config
    reopens it; another config closes it as KILLED and starts afresh."""
    if not marker.is_file():
        return None
    try:
        found = json.loads(marker.read_text())
        run_id, same = found["run_id"], found.get("config_hash") == chash
    except (ValueError, KeyError, TypeError):
        return None
    if same:
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            if MlflowClient().get_run(run_id).info.status == "RUNNING":
                return run_id
        return None
    mark_killed(run_id)
    return None


def _log_missing_epochs(run_id: str, history: list[dict]) -> None:
    """Epochs the checkpoint holds but MLflow lacks (a kill between the two writes), logged once."""
    logged = {m.step for m in MlflowClient().get_metric_history(run_id, "train_loss")}
    for record in history:
        if record["epoch"] not in logged:
            mlflow.log_metrics(numeric(record), step=record["epoch"])


def _remove_stale_temporaries(cfg: PipelineConfig) -> None:
    """What a killed training left half-written: temporary checkpoints and output folders."""
    for parent, stem in ((cfg.train.checkpoint.parent, cfg.train.checkpoint.name),
                         (cfg.train.out_dir.parent, cfg.train.out_dir.name)):
        for leftover in parent.glob(f".{stem}.*") if parent.is_dir() else []:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _resumable(path: Path, chash: str, dist: DistInfo) -> dict | None:
    """The checkpoint to resume from, or None; a checkpoint of another config is discarded."""
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    if state.get("config_hash") == chash:
        return state
    if dist.is_main:
        print(f"ignoring {path}: written for other params or data; starting afresh")
        if state.get("run_id"):
            mark_killed(state["run_id"])
    return None


def _write_outputs(cfg: PipelineConfig, name: str, family: Family, net: torch.nn.Module, prepared: Prepared,
                   history: list[dict], result: dict, run_id: str, timings: dict) -> None:
    """Log the model and files to MLflow, then swap the complete output directory into place."""
    logging_started = time.perf_counter()
    meta = prepared.meta
    out_dir = cfg.train.out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        plain = family.new_model(cfg.model, meta)  # plain BatchNorm, CPU: what evaluate and serving load
        plain.load_state_dict({k: v.cpu() for k, v in net.state_dict().items()})
        torch.save({"model": plain.state_dict(), "config": cfg.model_dump(mode="json"), "meta": meta.model_dump(),
                    "run_id": run_id, "metrics": result}, tmp / MODEL_FILE)
        # history.csv (DVC's plots, in git) holds what the run computed, not how long it took:
        # wall time differs on every run and machine, so the same results would read as changed.
        # The epochs' seconds go to run.json and the MLflow run instead.
        timings[TIMING] = [record[TIMING] for record in history]
        with open(tmp / HISTORY_FILE, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[key for key in history[0] if key != TIMING])
            writer.writeheader()
            writer.writerows({k: v for k, v in record.items() if k != TIMING} for record in history)
        curves_png(history, tmp / "curves.png")
        # What this model trained on (train and val sample keys): the gate leaves these out of any test split.
        fingerprint = np.unique(np.concatenate([family.sample_keys(cfg, prepared, split).ravel()
                                                for split in ("train", "val")]).astype(np.uint64))
        np.save(tmp / FINGERPRINT_FILE, fingerprint)
        mlflow.log_artifact(str(tmp / FINGERPRINT_FILE), FINGERPRINT_ARTIFACT)
        mlflow.log_metrics(summary_metrics(result))
        mlflow.log_artifact(str(tmp / MODEL_FILE), "checkpoint")
        mlflow.log_artifact(str(tmp / HISTORY_FILE), "training")
        mlflow.log_artifact(str(tmp / "curves.png"), "plots")
        info = log_served_model(family, cfg, meta, family.serving_model(cfg, plain, meta),
                                family.example_input(cfg, meta), name)
        version = register(MlflowClient(), cfg.promote.registered_model, info.model_uri, run_id, {
            INPUT_TAG: input_digest(family.input_description(cfg, meta)), "ratchet.pipeline": name,
            "ratchet.data.hash": meta.data_hash, "ratchet.fingerprint.samples": str(len(fingerprint)),
        })
        mlflow.set_tag("ratchet.registered_version", str(version.version))
        # The run's name says what it made: the runs table then reads like the registry.
        MlflowClient().update_run(run_id, name=f"{name} v{version.version}, {result['epochs']} epochs")
        timings["logging_seconds"] = time.perf_counter() - logging_started
        run = mlflow.get_run(run_id)
        (tmp / RUN_FILE).write_text(json.dumps({
            "run_id": run_id, "experiment": name, "experiment_id": run.info.experiment_id,
            "model_uri": info.model_uri, "registered_model": cfg.promote.registered_model,
            "version": int(version.version), "metrics": result, "timings": timings,
        }, indent=2) + "\n")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
