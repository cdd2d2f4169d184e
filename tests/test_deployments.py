"""Deployment definitions: entrypoints exist, schedules use the site's clock, runs never overlap."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from deployments.serve import deployments_for

ROOT = Path(__file__).resolve().parent.parent


def test_prefect_yaml_entrypoints_and_schedules() -> None:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert spec["pull"], "explicit pull steps"
    flows = set()
    for dep in spec["deployments"]:
        path, func = dep["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flows.add(getattr(module, func).name)
        assert dep["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
        assert all(s["timezone"] == "America/New_York" for s in dep["schedules"])
    assert flows == {"incremental-backup", "nightly-backup", "plan-context-backfill",
                     "treatment-report", "validation-sweep"}


def test_serve_builds_site_schedules_in_its_timezone() -> None:
    incremental, nightly, backfill, report, validation = deployments_for("DEMO")
    assert validation.schedules[0].schedule.cron == "0 4 * * 0"  # type: ignore[attr-defined]
    assert report.schedules[0].schedule.cron == "0 6 * * *"  # type: ignore[attr-defined]
    assert backfill.flow_name == "plan-context-backfill"  # type: ignore[attr-defined]
    assert incremental.flow_name == "incremental-backup"  # type: ignore[attr-defined]
    assert incremental.schedules[0].schedule.interval.total_seconds() == 600  # type: ignore[attr-defined]
    assert nightly.schedules[0].schedule.cron == "0 2 * * *"  # type: ignore[attr-defined]
    assert nightly.schedules[0].schedule.timezone == "America/New_York"  # type: ignore[attr-defined]
    assert incremental.concurrency_limit == 1  # type: ignore[attr-defined]
    assert incremental.parameters["site"] == "DEMO"  # type: ignore[attr-defined]
