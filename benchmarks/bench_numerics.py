"""What `numerics.mode: portable` costs against `fast`, per family, in one run (ratios).

    .venv/bin/python benchmarks/bench_numerics.py --rounds 3

Each pipeline of the project's params.yaml (the demo data) is prepared once in a scratch
folder, then trained by the real `ratchet train <pipeline>` under each mode, the modes
alternating round by round (the mode is read before torch starts, so each training is its own
process). Early stopping is off, so both modes train the same number of epochs. The figure is
the median epoch time from the stage's run.json (train.out_dir), first epoch left out (warm-up), and the
ratio portable/fast (> 1: portable is slower). The last line is one JSON object of the
ratios. Portable also pins the thread count (`numerics.threads`, 2 here); `fast` uses torch's
default, all of this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MODES = ("fast", "portable")


def ratchet(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-m", "ratchet", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"ratchet {' '.join(args)} failed:\n{done.stderr[-2000:]}")


def write_params(raw: dict, mode: str, epochs: int | None, path: Path) -> None:
    raw = json.loads(json.dumps(raw))
    raw["numerics"] = {**raw.get("numerics", {}), "mode": mode}
    for section in raw["pipelines"].values():
        section["train"]["early_stopping"] = {"patience": None}
        if epochs:
            section["train"]["epochs"] = epochs
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def epoch_seconds(run_file: Path) -> float:
    """The median epoch of a training, first epoch left out (warm-up), from its run.json."""
    seconds = json.loads(run_file.read_text())["timings"]["epoch_seconds"]
    return statistics.median(seconds[1:] or seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="override every pipeline's epochs")
    parser.add_argument("--pipelines", nargs="*", default=None)
    args = parser.parse_args()
    raw = yaml.safe_load(args.params.read_text())
    names = args.pipelines or list(raw["pipelines"])
    work = Path(tempfile.mkdtemp(prefix="bench-numerics-"))
    try:
        for mode in MODES:
            write_params(raw, mode, args.epochs, work / f"{mode}.yaml")
        ratchet(["demo-data", "--params", "fast.yaml"], work)
        for name in names:
            ratchet(["prepare", name, "--params", "fast.yaml"], work)
        times = {name: {mode: [] for mode in MODES} for name in names}
        for r in range(args.rounds):
            for name in names:
                for mode in MODES if r % 2 == 0 else MODES[::-1]:
                    ratchet(["train", name, "--params", f"{mode}.yaml"], work)
                    out = work / raw["pipelines"][name]["train"]["out_dir"]
                    times[name][mode].append(epoch_seconds(out / "run.json"))
                    shutil.rmtree(out)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        ratios = {}
        print(f"{'pipeline':<14}{'fast s/epoch':>14}{'portable s/epoch':>18}{'portable/fast':>15}")
        for name in names:
            fast, portable = (statistics.median(times[name][m]) for m in MODES)
            ratios[name] = round(portable / fast, 3)
            print(f"{name:<14}{fast:>14.4f}{portable:>18.4f}{ratios[name]:>15.3f}")
        print(json.dumps({"portable_over_fast": ratios}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
