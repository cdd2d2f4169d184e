"""Run a site's backup schedules in this process, without a work pool (one small server).

    python -m deployments.serve --site UCLA [--config /etc/radonc/sites.toml]

Serves ``incremental-backup`` every 10 minutes (never two at once), ``nightly-backup`` at
02:00, ``plan-context-backfill`` at 03:00, ``treatment-report`` at 06:00 and
``validation-sweep`` on Sundays at 04:00, in the site's timezone. Stop with Ctrl-C; runs and
schedules show in the Prefect UI.
"""

from __future__ import annotations

import argparse
import sys

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.schedules import Cron, Interval

from flows.incremental_backup import incremental_backup
from flows.nightly_backup import nightly_backup
from flows.plan_context_backfill import plan_context_backfill
from flows.treatment_report import treatment_report
from flows.validation_sweep import validation_sweep
from radonc_backup.config import load_site


def deployments_for(site: str, config: str | None = None) -> list[object]:
    cfg = load_site(site, config)
    params = {"site": site, "config": config}
    once = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    return [
        incremental_backup.to_deployment(
            name=site.lower(), parameters=params, concurrency_limit=once,
            schedule=Interval(600, timezone=cfg.timezone)),
        nightly_backup.to_deployment(
            name=site.lower(), parameters={**params, "days": 1}, concurrency_limit=once,
            schedule=Cron("0 2 * * *", timezone=cfg.timezone)),
        plan_context_backfill.to_deployment(
            name=site.lower(), parameters=params, concurrency_limit=once,
            schedule=Cron("0 3 * * *", timezone=cfg.timezone)),
        treatment_report.to_deployment(
            name=site.lower(), parameters=params, concurrency_limit=once,
            schedule=Cron("0 6 * * *", timezone=cfg.timezone)),
        validation_sweep.to_deployment(
            name=site.lower(), parameters=params, concurrency_limit=once,
            schedule=Cron("0 4 * * 0", timezone=cfg.timezone)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", required=True)
    parser.add_argument("--config", default=None)
    args = parser.parse_args(argv)
    serve(*deployments_for(args.site, args.config))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
