"""Run a site's backup schedules in this process, without a work pool (one small server).

    python -m deployments.serve --site UCLA [--config /etc/radonc/sites.toml]

Serves the site's five deployments (``<site>-incremental`` every 10 minutes, never two at once;
``<site>-nightly`` at 02:00, ``<site>-backfill`` at 03:00, ``<site>-report`` at 06:00 and
``<site>-validation`` on Sundays at 04:00 unless the site's ``[SITE.schedules]`` says otherwise),
in the site's timezone. Stop with Ctrl-C; runs and
schedules show in the Prefect UI.
"""

from __future__ import annotations

import argparse
import sys

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.schedules import Cron, Interval

from flows.downtime_pack import downtime_pack
from flows.incremental_backup import incremental_backup
from flows.fixity_sweep import fixity_sweep
from flows.inventory_sweep import inventory_sweep
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
            name=f"{site.lower()}-incremental", parameters=params, concurrency_limit=once,
            schedule=Interval(cfg.schedules.incremental_minutes * 60, timezone=cfg.timezone)),
        nightly_backup.to_deployment(
            name=f"{site.lower()}-nightly", parameters={**params, "days": 1},
            concurrency_limit=once, schedule=Cron(cfg.schedules.nightly, timezone=cfg.timezone)),
        plan_context_backfill.to_deployment(
            name=f"{site.lower()}-backfill", parameters=params, concurrency_limit=once,
            schedule=Cron(cfg.schedules.backfill, timezone=cfg.timezone)),
        treatment_report.to_deployment(
            name=f"{site.lower()}-report", parameters=params, concurrency_limit=once,
            schedule=Cron(cfg.schedules.report, timezone=cfg.timezone)),
        validation_sweep.to_deployment(
            name=f"{site.lower()}-validation", parameters=params, concurrency_limit=once,
            schedule=Cron(cfg.schedules.validation, timezone=cfg.timezone)),
        validation_sweep.to_deployment(
            name=f"{site.lower()}-validation-content", concurrency_limit=once,
            parameters={**params, "days": 31, "depth": "content"},
            schedule=Cron(cfg.schedules.validation_content, timezone=cfg.timezone)),
        inventory_sweep.to_deployment(
            name=f"{site.lower()}-inventory", parameters={**params, "repair": True},
            concurrency_limit=once,
            schedule=Cron(cfg.schedules.inventory, timezone=cfg.timezone)),
        fixity_sweep.to_deployment(
            name=f"{site.lower()}-fixity", parameters=params, concurrency_limit=once,
            schedule=Cron(cfg.schedules.fixity, timezone=cfg.timezone)),
        downtime_pack.to_deployment(
            name=f"{site.lower()}-downtime-pack", parameters=params, concurrency_limit=once,
            schedule=Cron(cfg.schedules.downtime_pack, timezone=cfg.timezone)),
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
