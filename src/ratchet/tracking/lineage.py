"""Lineage tags: which code, data and orchestration produced a run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

FLOW_RUN_ENV = "RATCHET_FLOW_RUN_ID"  # set by the Prefect flow for the stages it launches
COMMIT_ENV = "RATCHET_GIT_COMMIT"  # the commit an image was built from (infra/Dockerfile), where git has none


def git_state(root: Path) -> dict[str, str]:
    """The commit, and whether code or params differ from it ('unknown' outside git, unless
    RATCHET_GIT_COMMIT names it: the training image has a repository without commits).

    dvc.lock and the stages' own git-tracked outputs (metrics.json, promotion.json, DVC's
    .gitignore files) do not count: `dvc repro` rewrites them while it runs, so counting them
    would call every pipeline run from a clean checkout dirty.
    """

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD") or os.environ.get(COMMIT_ENV)
    generated = ["dvc.lock", "**/.gitignore", *_lock(root).get("outs", [])]
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                 *(f":(exclude,glob){path}" for path in generated))
    return {"commit": commit or "unknown", "dirty": "unknown" if status is None else str(bool(status)).lower()}


def _lock(root: Path) -> dict[str, dict[str, str]]:
    """dvc.lock's stage outputs: {"outs": {path: md5}} (empty without a dvc.lock)."""
    lock = Path(root) / "dvc.lock"
    outs: dict[str, str] = {}
    if lock.is_file():
        for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
            for entry in stage.get("outs", []):
                outs[entry["path"]] = entry.get("md5", "")
    return {"outs": outs}


def dvc_lock_hashes(root: Path, paths: list[Path]) -> dict[str, str]:
    """The md5 that dvc.lock records for each of `paths` (as an output of an earlier stage)."""
    recorded = _lock(root)["outs"]
    wanted = [os.path.relpath(p, root) for p in paths]
    return {rel: recorded[rel] for rel in wanted if recorded.get(rel)}


def lineage_tags(root: Path, meta, dvc_deps: list[Path]) -> dict[str, str]:
    """Tags tying a run to its code (git), data (`meta`: the prepared data's record) and DVC."""
    git = git_state(root)
    tags = {
        "ratchet.git.commit": git["commit"],
        "ratchet.git.dirty": git["dirty"],
        "ratchet.data.hash": meta.data_hash,
        "ratchet.data.source": meta.source,
    }
    for rel, md5 in dvc_lock_hashes(root, dvc_deps).items():
        tags[f"ratchet.dvc.{rel}"] = md5
    if os.environ.get(FLOW_RUN_ENV):
        tags["ratchet.prefect.flow_run_id"] = os.environ[FLOW_RUN_ENV]
    return tags
