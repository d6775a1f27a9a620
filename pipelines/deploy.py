"""Scheduled retraining: serve the retrain flow as a Prefect deployment with a cron schedule.

    prefect server start                                   # or: infra/docker-compose.yml
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m pipelines.deploy --cron "0 3 * * 1"          # Mondays 03:00; stays up, runs on schedule

Trigger a run by hand with `prefect deployment run 'ratchet-retrain/scheduled'`. Each run is
the same flow as `make run`: DVC decides what is stale, a failed training is retried and
resumes from its checkpoint, and `@champion` moves only through the promotion gate.
"""

from __future__ import annotations

import argparse
import os
import sys

from prefect.client.schemas.schedules import CronSchedule

from pipelines.retrain import retrain
from ratchet.config import load_params
from ratchet.errors import RatchetError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cron", default="0 3 * * 1", help="schedule, cron syntax (default: %(default)s)")
    parser.add_argument("--name", default="scheduled", help="deployment name (default: %(default)s)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--train-retries", type=int, default=2)
    parser.add_argument("pipelines", nargs="*", help="pipelines to retrain (default: all in params.yaml)")
    args = parser.parse_args(argv)
    try:
        CronSchedule(cron=args.cron)
    except ValueError:  # pydantic's ValidationError: a page of text for one bad field
        print(f"error: --cron {args.cron!r}: not a cron schedule (five fields: minute hour day-of-month month "
              "day-of-week, e.g. '0 3 * * 1')", file=sys.stderr)
        return 2
    if not os.environ.get("PREFECT_API_URL"):
        print("error: PREFECT_API_URL is not set: schedules need a Prefect server "
              "(prefect server start; export PREFECT_API_URL=http://127.0.0.1:4200/api)", file=sys.stderr)
        return 2
    try:
        params = load_params(args.params)
        for name in args.pipelines:
            params.pipeline(name)
    except RatchetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    retrain.serve(
        name=args.name,
        cron=args.cron,
        parameters={"pipelines": args.pipelines or None, "params_file": str(params.file),
                    "train_retries": args.train_retries},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
