"""The `ratchet` command: one subcommand per stage, as dvc.yaml calls them.

    ratchet demo-data                 # write the built-in demo datasets (params: demo.dir)
    ratchet prepare  <pipeline>       # validate, split, preprocess
    ratchet train    <pipeline>       # train (torchrun when train.nproc > 1), log to MLflow
    ratchet evaluate <pipeline>       # test metrics, report, plots
    ratchet promote  <pipeline>       # register; move @champion only if better
    ratchet pipelines                 # list the pipelines in params.yaml
    ratchet predict  <pipeline> INPUT --out FILE [--model models:/<name>@champion | /<version>]
                                      # score new data with a registered model (ratchet.serve.predict)

Every subcommand takes `--params PATH` (default: params.yaml). Bad input ends with one line,
`error: ...`, and exit status 2 (the flow does not retry it); a process that died under
torchrun ends with `failed: ...` and exit status 1 (the flow retries it).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import signal
import sys

from ratchet.errors import RatchetError, StageFailed

from ratchet.stages import STEPS as STAGES, UNPINNED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ratchet", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("demo-data", "pipelines", *STAGES):
        cmd = sub.add_parser(name)
        if name in STAGES:
            cmd.add_argument("pipeline", help="a pipeline section of params.yaml, e.g. tabular")
        cmd.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    predict = sub.add_parser("predict", help="score new data with a registered model (default: @champion)")
    predict.add_argument("pipeline", help="a pipeline of params.yaml, or a registered model name (no params.yaml)")
    predict.add_argument("input", help="a CSV of rows, an image file or folder, or a series CSV")
    predict.add_argument("--out", required=True, help="the CSV to write")
    predict.add_argument("--model", help="models:/<name>@<alias>, models:/<name>/<version>, @<alias> or a version "
                                         "(default: the pipeline's @champion)")
    predict.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    args = parser.parse_args(argv)
    skip_final_collection()
    # SIGTERM (Kubernetes, Prefect cancel, torchrun stopping siblings) unwinds like Ctrl-C, so
    # MLflow runs are closed as KILLED and temporary files removed; the checkpoint stays to resume.
    signal.signal(signal.SIGTERM, _interrupt)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per event in a stage's log
    try:
        return _dispatch(args)
    except StageFailed as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"failed: {exc}", file=sys.stderr)
        return 1
    except RatchetError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process fails alike; one says so
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def skip_final_collection() -> None:
    """At exit, no garbage collection over the millions of objects that importing torch,
    torch.export and MLflow made: Python's finalisation spends ~1 s of a short stage on 2 cores on
    it. Registered first, so it runs after every other exit handler (MLflow ending its runs);
    modules are still torn down, their objects freed by reference counting. Only objects in
    reference cycles go unfinalised, which Python does not promise to finalise at exit anyway."""
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _dispatch(args: argparse.Namespace) -> int:
    from ratchet.config import load_params

    if args.command == "predict":  # needs no params.yaml: MLFLOW_TRACKING_URI may name the store
        from ratchet.serve.predict import run

        run(args.pipeline, args.input, args.out, args.model, args.params)
        return 0

    params = load_params(args.params)
    if args.command == "pipelines":
        print("\n".join(params.pipelines))
    elif args.command == "demo-data":
        from ratchet.data.demo import write_demo

        for path in write_demo(params.demo.dir):
            print(f"wrote {path}")
    else:
        from importlib import import_module

        from ratchet.numerics import pin

        if args.command not in UNPINNED:
            pin(params.numerics)  # before the stage imports torch: the kernels it picks depend on it
        import_module(f"ratchet.stages.{args.command}").run(params, args.pipeline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
