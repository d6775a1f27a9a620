"""Scheduled retraining: the retrain flow as a Prefect deployment with a cron schedule.

    make team-up                                  # PostgreSQL, MLflow, a Prefect server and worker,
                                                  # and this deployment (pipelines/team.py)
    python -m pipelines.deploy --pool ratchet     # (re)register it for a work pool's worker; exits
    python -m pipelines.deploy                    # or serve it from this process (stays up)

The schedule and the pipelines it retrains come from params.yaml's `schedule:` section;
`--cron` and the positional pipeline names override them. Trigger a run by hand with
`prefect deployment run 'ratchet-retrain/scheduled'`. Each run is the same flow as `make run`:
DVC decides what is stale, a failed training is retried and resumes from its checkpoint,
`@champion` moves only through the promotion gate, and at most one run of the deployment runs
at a time (a second waits for the first; the flow also waits for any other run in the same
project, one started by hand included). A served deployment stops on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from prefect.client.schemas.schedules import CronSchedule

from pipelines.retrain import retrain
from ratchet.config import load_params
from ratchet.errors import RatchetError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cron", help="schedule, cron syntax (default: params.yaml's schedule.cron)")
    parser.add_argument("--name", default="scheduled", help="deployment name (default: %(default)s)")
    parser.add_argument("--pool", help="register the deployment for this Prefect work pool (a worker runs it) "
                                       "and exit, instead of serving it from this process")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--train-retries", type=int, default=2)
    parser.add_argument("pipelines", nargs="*", help="pipelines to retrain (default: params.yaml's "
                                                     "schedule.pipelines, else all)")
    args = parser.parse_args(argv)
    if args.cron is not None:
        try:
            CronSchedule(cron=args.cron)
        except ValueError:  # pydantic's ValidationError: a page of text for one bad field
            print(f"error: --cron {args.cron!r}: not a cron schedule (five fields: minute hour day-of-month month "
                  "day-of-week, e.g. '0 3 * * 1')", file=sys.stderr)
            return 2
    if not os.environ.get("PREFECT_API_URL"):
        print("error: PREFECT_API_URL is not set: schedules need a Prefect server "
              "(make team-up; source team.env)", file=sys.stderr)
        return 2
    try:
        params = load_params(args.params)
        for name in args.pipelines:
            params.pipeline(name)
    except RatchetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cron = args.cron or params.schedule.cron
    pipelines = args.pipelines or params.schedule.pipelines or None
    parameters = {"pipelines": pipelines, "params_file": str(params.file), "train_retries": args.train_retries}
    if args.pool:
        # The worker runs the flow from this checkout (Prefect's local storage: its pull step
        # changes into this folder), so its dvc.lock, DVC cache and checkpoints are the ones
        # `make run` uses. concurrency_limit=1: a second run waits (Prefect's ENQUEUE).
        # The entry point is the installed module, not a file: the project need not hold pipelines/.
        from prefect.deployments.runner import EntrypointType

        deployment = retrain.from_source(source=str(params.root), entrypoint="pipelines.retrain.retrain")
        deployment_id = deployment.deploy(
            name=args.name, work_pool_name=args.pool, cron=cron, parameters=parameters, concurrency_limit=1,
            entrypoint_type=EntrypointType.MODULE_PATH, build=False, push=False, print_next_steps=False,
            ignore_warnings=True)
        print(f"deployment ratchet-retrain/{args.name} ({deployment_id}) on work pool {args.pool!r}: "
              f"cron {cron!r}, pipelines: {', '.join(pipelines or params.pipelines)}")
        return 0
    asyncio.run(serve(args.name, cron, parameters))
    print("stopped serving: scheduled runs wait for the next `python -m pipelines.deploy`", file=sys.stderr)
    return 0


async def serve(name: str, cron: str, parameters: dict) -> None:
    """Serve the deployment from this process until Ctrl-C or SIGTERM, then stop: a flow run in
    progress is cancelled (its training resumes from its checkpoint next time).

    Prefect's Runner sets its own SIGTERM handler when it starts, which schedules its shutdown
    on a loop it does not await and pauses the deployment; and a shell that starts this in the
    background sets SIGINT to be ignored. Both signals here cancel the runner instead, after
    it has started."""
    from prefect.runner import Runner

    runner = Runner(name=name, pause_on_shutdown=False)
    await runner.aadd_flow(retrain, name=name, cron=cron, parameters=parameters, concurrency_limit=1)
    print(f"serving ratchet-retrain/{name}: cron {cron!r}; Ctrl-C or SIGTERM stops", flush=True)
    serving = asyncio.create_task(runner.start())
    await asyncio.sleep(0)  # runner.start() has set its handler: replace it
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, serving.cancel)
    try:
        await serving
    except asyncio.CancelledError:
        pass

if __name__ == "__main__":
    sys.exit(main())
