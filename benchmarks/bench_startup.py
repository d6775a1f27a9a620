"""Start-up of the stages: wall time and import time per stage, this code against an older one.

    .venv/bin/python benchmarks/bench_startup.py --before c7598b4 --rounds 3

A scratch project holds the demo tabular pipeline (569 rows, 86 test rows), prepared and trained
once. Then each round runs `ratchet evaluate tabular` and `ratchet promote tabular` under the
code at `--before` (its src/ put first on PYTHONPATH) and under this checkout's, the sides
alternating, each twice: as `python -m ratchet ...` for the wall time of the process, and as
`python -X importtime -m ratchet ...` for, from its import log, the seconds spent importing (all
top-level imports) and in the heaviest packages (cumulative). The log is the stage process's
own: promote's scoring process (ratchet.tracking.scorer), which imports torch and its pt2 loader
beside it, is not in it. Medians over the rounds; the last line is one JSON object of them.
The older code gets the same params without the sections it does not know (`numerics`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("evaluate", "promote")
PACKAGES = ("torch", "mlflow", "torchmetrics", "torchvision", "matplotlib", "pandas")
LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def run(args: list[str], cwd: Path, src: Path | None, params: str, importtime: bool = True) -> tuple[float, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "ratchet", *args,
                           "--params", params], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"ratchet {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stderr


def import_seconds(log: str) -> dict[str, float]:
    """Total import time (sum of the top-level imports' cumulative times) and each package's:
    the cumulative times of its modules (`torchmetrics`, `torchmetrics.classification`, ...)
    imported from outside the package, so what they import counts and nothing twice."""
    total, packages = 0, {}
    stack: list[tuple[int, str]] = []  # the ancestors of a line: the log is post-order, so read it reversed
    for self_us, cumulative, indent, name in reversed(LINE.findall(log)):
        depth = len(indent)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if depth == 1:  # a top-level import: its cumulative time holds everything below it
            total += int(cumulative)
        for package in PACKAGES:
            inside = name == package or name.startswith(package + ".")
            parent = stack[-1][1] if stack else ""
            if inside and not (parent == package or parent.startswith(package + ".")):
                packages[package] = packages.get(package, 0) + int(cumulative)
        stack.append((depth, name))
    return {"imports": total / 1e6, **{k: v / 1e6 for k, v in packages.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default=None, help="a git revision to compare with (default: none)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pipeline", default="tabular")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    try:
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        raw["pipelines"] = {args.pipeline: raw["pipelines"][args.pipeline]}
        (work / "after.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        sides: dict[str, Path | None] = {"after": None}
        if args.before:
            old = {k: v for k, v in raw.items() if k != "numerics"}
            (work / "before.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
            archive = subprocess.run(["git", "archive", args.before, "src"], cwd=ROOT, capture_output=True, check=True)
            (work / "old").mkdir()
            subprocess.run(["tar", "-x", "-C", str(work / "old")], input=archive.stdout, check=True)
            sides = {"before": work / "old/src", "after": None}
        for stage in ("demo-data", "prepare", "train"):
            run([stage] if stage == "demo-data" else [stage, args.pipeline], work, None, "after.yaml")
        results = {side: {stage: [] for stage in STAGES} for side in sides}
        for r in range(args.rounds):
            for side in sides if r % 2 == 0 else list(sides)[::-1]:
                for stage in STAGES:
                    seconds, _ = run([stage, args.pipeline], work, sides[side], f"{side}.yaml", importtime=False)
                    _, log = run([stage, args.pipeline], work, sides[side], f"{side}.yaml")
                    results[side][stage].append({"wall": seconds, **import_seconds(log)})
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        summary = {}
        print(f"{'side':<8}{'stage':<10}{'wall s':>8}{'imports s':>11}" + "".join(f"{p:>13}" for p in PACKAGES))
        for side, stages in results.items():
            for stage, rows in stages.items():
                keys = ["wall", "imports", *PACKAGES]
                med = {k: round(statistics.median(r.get(k, 0.0) for r in rows), 2) for k in keys}
                summary[f"{side}_{stage}"] = med
                print(f"{side:<8}{stage:<10}{med['wall']:>8.2f}{med['imports']:>11.2f}"
                      + "".join(f"{med[p]:>13.2f}" for p in PACKAGES))
        print(json.dumps({"startup": summary}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
