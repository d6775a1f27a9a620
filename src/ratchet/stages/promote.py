"""Promote the trained version if it beats the champion: `ratchet promote tabular`.

The train stage registered the run's model as a new version of `promote.registered_model`.
This stage scores that version and the current `@champion` on the same test split, now (never
a number stored from other data), leaving out every test sample that either of them trained
on (each version keeps a fingerprint of its training and validation samples): both are loaded
from the registry (pt2 only: nothing pickled is run), raw test inputs in, so each applies its
own preprocessing. `@champion` moves only if the new version is better by more than
`promote.min_delta`. The decision and reason are tagged on the version and written to
`promote.out` (promotion.json).

The scoring runs in a worker process (ratchet.tracking.scorer), started first: it imports torch
and reads the test split on the second core while this one imports MLflow and reads the
registry, so MLflow is imported inside the functions below, after it started.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from ratchet.config import Params
from ratchet.data.prepared import write_json
from ratchet.errors import RatchetError
from ratchet.families import Family, get_family
from ratchet.stages import stage_name
from ratchet.tracking.scorer import Scorer


def run(params: Params, name: str) -> dict:
    cfg = params.pipeline(name)
    with Scorer(params.numerics, cfg) as scorer:
        return _promote(params, cfg, name, scorer)


def _promote(params: Params, cfg, name: str, scorer: Scorer) -> dict:
    from mlflow import MlflowClient

    from ratchet.tracking.registry import champion_version, promotion_lock, record
    from ratchet.tracking.runs import tracked_run

    family = get_family(cfg.family)
    prepared = family.load(cfg.prepare.out_dir)
    run_info = tracked_run(cfg.train.out_dir, params.root, stage_name("train", name))
    registered = cfg.promote.registered_model
    client = MlflowClient()
    version = client.get_model_version(registered, str(run_info["version"]))
    with promotion_lock(client, registered):  # read the champion, score, move the alias: one promotion at a time
        champion = champion_version(client, registered)
        decision, overlap, unchanged = _decide(scorer, client, family, cfg, prepared, version, champion)
        if not unchanged:  # a re-run keeps the tags of the decision that promoted it
            record(client, registered, version, decision)
            client.set_tag(run_info["run_id"], "ratchet.promoted", str(decision.promoted).lower())

    before = decision.champion_version
    result = {
        "registered_model": registered, "version": int(version.version), "promoted": decision.promoted,
        "reason": decision.reason, "metric": decision.metric, "score": decision.score,
        "champion_before": None if before is None else {"version": int(before), "score": decision.champion_score},
        "champion_after": int(version.version) if decision.promoted or unchanged else int(before),
        "champion_unchanged": not decision.promoted,
        "scored_on": overlap["scored_on"],
        "overlap_excluded": overlap["excluded"],  # test samples left out: in a model's training or validation data
    }
    write_json(cfg.promote.out, result)
    verdict = "promoted to @champion" if decision.promoted else "stays @champion" if unchanged else "not promoted"
    print(f"{registered} v{version.version} {verdict}: {decision.reason}")
    return result


def _decide(scorer: Scorer, client, family: Family, cfg, prepared, version, champion):
    """(decision, overlap counts, whether `version` is the champion already), with the lock held."""
    from ratchet.tracking.registry import Decision, check_comparable, decide

    registered, meta, metric = cfg.promote.registered_model, prepared.meta, cfg.promote.metric
    if champion is not None:
        check_comparable(champion, family.input_description(cfg, meta), registered)
    overlap, keep = unseen(family, cfg, prepared, {"challenger": version, "champion": champion})
    if overlap["excluded"]["total"] and overlap["scored_on"] < cfg.promote.min_samples:
        raise RatchetError(f"registered model '{registered}': only {overlap['scored_on']} of {overlap['of']} test "
                           f"samples are unseen by both models ({_excluded_text(overlap)}); promote.min_samples is "
                           f"{cfg.promote.min_samples}: the gate refuses to compare them (hold out new test data)")
    keep = keep if overlap["scored_on"] < overlap["of"] else None  # None: all of them
    score = score_version(scorer, client, registered, version.version, keep, metric)
    if champion is not None and champion.version == version.version:
        return Decision(False, f"v{version.version} is @champion already: champion unchanged", metric, score,
                        version.version, score), overlap, True
    rival = None
    if champion is not None:
        rival = (champion.version, score_version(scorer, client, registered, champion.version, keep, metric))
    decision = decide(metric, score, rival, cfg.promote.direction, cfg.promote.min_delta)
    return replace(decision, reason=f"{decision.reason} on {overlap['scored_on']} of {overlap['of']} test samples "
                                    f"({_excluded_text(overlap)})"), overlap, False


def unseen(family: Family, cfg, prepared, versions: dict) -> tuple[dict, np.ndarray]:
    """Which test samples neither version trained on (by the fingerprint each version keeps of its
    training and validation samples): a model scored on its own training data looks better than
    it is, and a seed change or appended rows put the champion's training rows into a new test
    split. Returns the counts (for promotion.json) and the indices of the samples to score."""
    from ratchet.tracking.registry import fingerprint

    keys = family.sample_keys(cfg, prepared, "test")
    seen = np.zeros(len(keys), dtype=bool)
    excluded: dict[str, int | None] = {}
    for role, version in versions.items():
        if version is None:
            continue
        known = fingerprint(version)
        if known is None:  # registered before fingerprints: its training data is unknown
            excluded[role] = None
            continue
        hit = np.isin(keys, known).any(axis=1)
        excluded[role] = int(hit.sum())
        seen |= hit
    excluded["total"] = int(seen.sum())
    return {"of": len(keys), "scored_on": int((~seen).sum()), "excluded": excluded}, np.flatnonzero(~seen)


def _excluded_text(overlap: dict) -> str:
    parts = overlap["excluded"]
    unknown = [role for role in ("champion", "challenger") if role in parts and parts[role] is None]
    text = f"{parts['total']} excluded as training or validation data of a model"
    return text + "".join(f"; the {role} has no fingerprint of its training data" for role in unknown)


def score_version(scorer: Scorer, client, name: str, version: str, keep: np.ndarray | None, metric: str) -> float:
    """`metric` of version `version` of registered model `name` on the test samples at indices
    `keep` (None: all), from its pt2 program, raw test inputs in, scored by the family in the
    scoring process (the same metric code for the new version and the champion)."""
    from ratchet.tracking.registry import served_program, version_label

    with tempfile.TemporaryDirectory(prefix="ratchet-model-") as tmp:
        program = served_program(client, name, str(version), Path(tmp))
        return scorer.score(program, version_label(name, version), keep, metric)
