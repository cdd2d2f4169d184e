"""Deployment definitions: entrypoints exist, per-site names, the site's clock, no overlap."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from deployments.register import HEARTBEAT_TAG, prefect_file_for, site_deployments, \
    worker_command
from deployments.serve import deployments_for
from radonc_backup.config import load_site
from radonc_backup.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
KINDS = ["incremental", "nightly", "backfill", "report", "validation", "validation-content",
         "downtime-pack", "fixity", "inventory", "restore", "export", "department-backfill"]


def test_prefect_yaml_entrypoints_and_schedules() -> None:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    [check, chdir] = spec["pull"]
    assert "RADONC_BACKUP_HOME" in check["prefect.deployments.steps.run_shell_script"]["script"]
    assert "set_working_directory" in next(iter(chdir))
    flows = set()
    per_site = [d for d in spec["deployments"] if d["name"] != "crash-notice"]
    for dep in per_site:
        path, func = dep["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flows.add(getattr(module, func).name)
        assert dep["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
        assert all(s["timezone"] == "America/New_York" for s in dep.get("schedules", []))
    assert [d["name"] for d in per_site] == [f"demo-{k}" for k in KINDS]
    assert flows == {"incremental-backup", "nightly-backup", "plan-context-backfill",
                     "treatment-report", "validation-sweep", "downtime-pack", "restore",
                     "export", "inventory-sweep", "fixity-sweep"}


def test_register_deploys_the_set_once_per_site_in_its_timezone() -> None:
    sites = [load_site("DEMO"), load_site("UCLA")]
    spec = prefect_file_for(sites, "radonc-backup")
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert list(by_name) == [f"{s}-{k}" for s in ("demo", "ucla") for k in KINDS] + [
        "ucla-mosaiq-summary", "crash-notice"]  # UCLA has a Mosaiq source, DEMO none
    summary = by_name["ucla-mosaiq-summary"]
    assert summary["parameters"] == {"site": "UCLA", "source": "mosaiq"}
    assert summary["entrypoint"] == "flows/mosaiq_summary.py:mosaiq_summary"
    assert summary["schedules"] == [{"cron": "0 6 * * *", "timezone": "America/Los_Angeles"}]
    assert "parameters" not in by_name["crash-notice"]  # a sweep; the automation names a run
    assert by_name["crash-notice"]["schedules"] == [{"interval": 600, "timezone": "UTC"}]
    assert by_name["crash-notice"]["concurrency_limit"] == {"limit": 1,
                                                            "collision_strategy": "ENQUEUE"}
    ucla = by_name["ucla-incremental"]
    assert ucla["parameters"] == {"site": "UCLA"}
    assert ucla["schedules"] == [{"interval": 600, "timezone": "America/Los_Angeles"}]
    assert ucla["description"].endswith("(site UCLA)") and ucla["tags"] == ["site-UCLA"]
    assert by_name["ucla-nightly"]["parameters"] == {"site": "UCLA", "days": 1}
    assert by_name["ucla-report"]["schedules"] == [{"cron": "0 6 * * *",
                                                    "timezone": "America/Los_Angeles"}]
    assert by_name["ucla-validation"]["schedules"][0]["cron"] == "0 4 * * 0"
    assert {d["work_pool"]["name"] for d in spec["deployments"]} == {"radonc-backup"}


def test_with_a_heartbeat_every_deployment_sets_its_runs_interval_and_carries_the_watched_tag(
        ) -> None:
    spec = prefect_file_for([load_site("UCLA")], "radonc-backup", heartbeat=60)
    for dep in spec["deployments"]:
        assert dep["tags"][-1] == HEARTBEAT_TAG, dep["name"]
        env = dep["work_pool"]["job_variables"]["env"]
        assert env == {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "60"}, dep["name"]
    assert {d["name"] for d in spec["deployments"]} >= {"ucla-incremental", "crash-notice"}
    [notice] = [d for d in spec["deployments"] if d["name"] == "crash-notice"]
    assert notice["parameters"] == {"heartbeat_seconds": 60}, "its sweep knows the interval"


def test_a_site_sets_its_own_schedules(tmp_path: Path) -> None:
    text = (ROOT / "config" / "environments.toml").read_text()
    path = tmp_path / "sites.toml"
    path.write_text(text + '\n[DEMO.schedules]\nincremental_minutes = 5\nreport = "30 5 * * 1-5"\n')
    template = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    deps = {d["name"]: d for d in site_deployments(template, load_site("DEMO", path), "p")}
    assert deps["demo-incremental"]["schedules"][0]["interval"] == 300
    assert deps["demo-report"]["schedules"][0]["cron"] == "30 5 * * 1-5"
    path.write_text(text + '\n[DEMO.schedules]\nreport = "every morning"\n')
    with pytest.raises(ConfigError, match="schedules.report"):
        load_site("DEMO", path)


def test_worker_command_carries_what_a_worker_needs() -> None:
    line = worker_command("radonc-backup", None)
    assert f"RADONC_BACKUP_HOME={ROOT}" in line
    assert f"RADONC_BACKUP_CONFIG={ROOT / 'config' / 'environments.toml'}" in line
    assert "PREFECT_API_URL=" in line
    assert line.endswith("-m deployments.worker --pool radonc-backup")


def test_serve_builds_site_schedules_in_its_timezone() -> None:
    incremental, nightly, backfill, report, validation, content, inventory, fixity, pack = \
        deployments_for("DEMO")
    assert fixity.schedules[0].schedule.cron == "0 0 22 * *"  # type: ignore[attr-defined]
    assert pack.schedules[0].schedule.cron == "30 4 * * *"  # type: ignore[attr-defined]
    assert inventory.schedules[0].schedule.cron == "0 1 15 * *"  # type: ignore[attr-defined]
    assert inventory.parameters["repair"] is True  # type: ignore[attr-defined]
    assert incremental.name == "demo-incremental"  # type: ignore[attr-defined]
    assert validation.schedules[0].schedule.cron == "0 4 * * 0"  # type: ignore[attr-defined]
    assert content.schedules[0].schedule.cron == "0 5 1 * *"  # type: ignore[attr-defined]
    assert content.parameters["depth"] == "content"  # type: ignore[attr-defined]
    assert report.schedules[0].schedule.cron == "0 6 * * *"  # type: ignore[attr-defined]
    assert backfill.flow_name == "plan-context-backfill"  # type: ignore[attr-defined]
    assert incremental.flow_name == "incremental-backup"  # type: ignore[attr-defined]
    assert incremental.schedules[0].schedule.interval.total_seconds() == 600  # type: ignore[attr-defined]
    assert nightly.schedules[0].schedule.cron == "0 2 * * *"  # type: ignore[attr-defined]
    assert nightly.schedules[0].schedule.timezone == "America/New_York"  # type: ignore[attr-defined]
    assert incremental.concurrency_limit == 1  # type: ignore[attr-defined]
    assert incremental.parameters["site"] == "DEMO"  # type: ignore[attr-defined]


def test_flow_parameters_are_described_for_the_run_form() -> None:
    from flows.incremental_backup import incremental_backup
    from flows.treatment_report import treatment_report

    from flows.mosaiq_summary import mosaiq_summary

    for flow_obj in (incremental_backup, treatment_report, mosaiq_summary):
        props = flow_obj.parameters.model_dump()["properties"]
        assert all(p.get("description") for p in props.values()), flow_obj.name


def test_a_site_with_a_scratch_orthanc_gets_a_monthly_drill() -> None:
    from deployments.register import drills
    from radonc_backup.config import OrthancTarget

    site = load_site("DEMO")
    assert drills(site, "radonc-backup") == []
    scratch = OrthancTarget(type="orthanc", aet="SCRATCH", ip="127.0.0.1", port=4343,
                            rest_url="http://127.0.0.1:8043")
    [drill] = drills(site.model_copy(update={"restore_targets": {"scratch": scratch}}),
                     "radonc-backup")
    assert (drill["name"], drill["parameters"]["target"]) == ("demo-dr-drill", "scratch")
    assert drill["schedules"] == [{"cron": "0 6 2 * *", "timezone": "America/New_York"}]
    assert drill["entrypoint"] == "flows/dr_drill.py:dr_drill"
