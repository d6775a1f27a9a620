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
from mlflow import MlflowClient

from ratchet.config import Params
from ratchet.data.prepared import write_json
from ratchet.families import Family, get_family
from ratchet.stages import stage_name
from ratchet.tracking.registry import Decision, champion_version, check_comparable, decide, record
from ratchet.tracking.runs import tracked_run


def run(params: Params, name: str) -> dict:
    cfg = params.pipeline(name)
    family = get_family(cfg.family)
    prepared = family.load(cfg.prepare.out_dir)
    run_info = tracked_run(cfg.train.out_dir, params.root, stage_name("train", name))
    meta, registered = prepared.meta, cfg.promote.registered_model
    x, y = family.gate_data(cfg, prepared)
    client = MlflowClient()

    champion = champion_version(client, registered)
    if champion is not None:
        check_comparable(champion, family.input_description(cfg, meta), registered)
    version = client.get_model_version(registered, str(run_info["version"]))
    metric = cfg.promote.metric
    score = score_model(family, cfg, f"models:/{registered}/{version.version}", meta, x, y, metric)
    if champion is not None and champion.version == version.version:
        decision = Decision(True, f"v{version.version} is already @champion", metric, score, version.version, score)
    else:
        rival = None
        if champion is not None:
            rival = (champion.version, score_model(family, cfg, f"models:/{registered}/{champion.version}", meta, x, y, metric))
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


def score_model(family: Family, cfg, model_uri: str, meta, x, y, metric: str) -> float:
    """`metric` of the registered model at `model_uri` on raw test inputs `x` and targets `y`,
    scored by the family (the same metric code for the new version and the champion)."""
    model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    return family.score(cfg, model, meta, x, y, metric)
