"""Promote the trained version if it beats the champion: `ratchet promote tabular`.

The train stage registered the run's model as a new version of `promote.registered_model`.
This stage scores that version and the current `@champion` on the same test split, now (never
a number stored from other data): both are loaded from the registry, raw test inputs in, so
each applies its own preprocessing. `@champion` moves only if the new version is better by more than
`promote.min_delta`. The decision and reason are tagged on the version and written to
`promote.out` (promotion.json).
"""

from __future__ import annotations


import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection

from ratchet.config import Params
from ratchet.data.prepared import load_prepared, write_json
from ratchet.data import samples
from ratchet.evaluate.metrics import task, test_metrics
from ratchet.models.serving import input_description
from ratchet.tracking.registry import Decision, champion_version, check_comparable, decide, record
from ratchet.tracking.runs import tracked_run


def run(params: Params, name: str) -> dict:
    cfg = params.pipeline(name)
    prepared = load_prepared(cfg.prepare.out_dir)
    run_info = tracked_run(cfg.train.out_dir, params.root, name)
    meta, registered = prepared.meta, cfg.promote.registered_model
    x, y = samples(prepared, "test", raw=True) if task(meta) == "forecast" else \
        (prepared.array(meta["serving_input"]), prepared.array("test_y"))
    client = MlflowClient()

    champion = champion_version(client, registered)
    if champion is not None:
        check_comparable(champion, input_description(meta), registered)
    version = client.get_model_version(registered, str(run_info["version"]))
    metric, classes = cfg.promote.metric, len(meta.get("classes", []))
    score = score_model(f"models:/{registered}/{version.version}", x, y, classes, metric)
    if champion is not None and champion.version == version.version:
        decision = Decision(True, f"v{version.version} is already @champion", metric, score, version.version, score)
    else:
        rival = None
        if champion is not None:
            rival = (champion.version, score_model(f"models:/{registered}/{champion.version}", x, y, classes, metric))
        decision = decide(metric, score, rival, cfg.promote.direction, cfg.promote.min_delta)
    record(client, registered, version, decision)
    client.set_tag(run_info["run_id"], "ratchet.promoted", str(decision.promoted).lower())

    before = decision.champion_version
    result = {
        "registered_model": registered, "version": int(version.version), "promoted": decision.promoted,
        "reason": decision.reason, "metric": metric, "score": score,
        "champion_before": None if before is None else {"version": int(before), "score": decision.champion_score},
        "champion_after": int(version.version) if decision.promoted else int(before),
    }
    write_json(cfg.promote.out, result)
    verdict = "promoted to @champion" if decision.promoted else "not promoted"
    print(f"{registered} v{version.version} {verdict}: {decision.reason}")
    return result


@torch.no_grad()
def score_model(model_uri: str, x, y, num_classes: int, metric: str) -> float:
    """`metric` of the registered model at `model_uri` on raw inputs `x` with labels `y` (class
    indices; with `num_classes` 0, forecast targets and an error metric: mse, mae or rmse)."""
    model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    if num_classes:
        metrics = test_metrics(num_classes, torch.device("cpu"))
    else:
        metrics = MetricCollection({"mse": MeanSquaredError(), "mae": MeanAbsoluteError(),
                                    "rmse": MeanSquaredError(squared=False)})
        metrics.set_dtype(torch.float64)
    step = max(1, (64 << 20) // max(1, x[:1].nbytes))  # about 64 MB of inputs at a time, read from the memmap
    for start in range(0, len(x), step):
        inputs = torch.as_tensor(np.array(x[start : start + step]))  # a writable copy of the chunk
        target = torch.as_tensor(np.array(y[start : start + step]))
        output = model(inputs)
        if not num_classes:  # errors summed in float64, as the evaluate stage does
            output, target = output.double(), target.double()
        metrics.update(output, target)
    return float(metrics.compute()[metric])
