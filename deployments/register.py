"""Register RadOnc Backup with a Prefect server: work pool, R&V load limits, deployments.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m deployments.register [--config FILE]

1. creates the process work pool (``radonc-backup``) if it is missing;
2. creates or resizes, for every DICOM source of every site in the config, the global
   concurrency limit that caps associations with that R&V AE (``max_associations``);
3. deploys the five schedules of ``prefect.yaml`` once per site, named ``<site>-incremental``,
   ``<site>-nightly``, ``<site>-backfill``, ``<site>-report`` and ``<site>-validation``, in the
   site's timezone, with the ``site`` parameter limited to the sites of the config (skip with
   ``--no-deploy``);
4. deploys ``crash-notice`` and an automation that starts it for every run that ends Crashed
   (a killed process cannot run its own failure hook, so this sends the site's e-mail); its
   10-minute sweep also marks Crashed a run whose heartbeats stopped (its machine died: no
   worker is left to say so), at the heartbeat interval set here;
5. prints the command that starts a worker, with the environment it needs.

Run it again after changing the config or ``prefect.yaml``; it only creates or updates.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentUpdate, WorkPoolCreate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.exceptions import ObjectNotFound
from prefect.workers.process import ProcessWorker

from radonc_backup.config import CONFIG_ENV, PROJECT_ROOT, STATE_DIR_ENV, MosaiqSource, Site, \
    config_path, load_site, site_names
from flows.crash_notice import HEARTBEAT_TAG, MISSED_HEARTBEATS
from radonc_backup.errors import BackupError
from tasks.limits import ensure_rv_limits

WORK_POOL = "radonc-backup"
TEMPLATE_SITE = "DEMO"
PREFECT_FILE = PROJECT_ROOT / "prefect.yaml"


def ensure_work_pool(name: str = WORK_POOL) -> bool:
    """Create the process work pool if missing; True when it was created."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process",
                base_job_template=ProcessWorker.get_default_base_job_template()))
            return True


def register_limits(config: str | None, sites: list[str]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for name in sites:
        sizes.update(ensure_rv_limits(load_site(name, config), update=True))
    return sizes


def site_deployments(template: list[dict[str, Any]], site: Site, pool: str,
                     ) -> list[dict[str, Any]]:
    """The template's deployments (written for DEMO) for one site: names, parameter, timezone."""
    prefix = TEMPLATE_SITE.lower() + "-"
    out = []
    for dep in template:
        if "site" not in dep.get("parameters", {}):
            continue  # not a per-site deployment (crash-notice)
        dep = copy.deepcopy(dep)
        kind = dep["name"].removeprefix(prefix)
        dep["name"] = f"{site.name.lower()}-{kind}"
        dep["parameters"] = {**dep.get("parameters", {}), "site": site.name}
        dep["description"] = dep.get("description", "").replace(
            f"(site {TEMPLATE_SITE})", f"(site {site.name})")
        dep["tags"] = [f"site-{site.name}"]
        dep["schedules"] = [schedule_for(kind, site)] if dep.get("schedules") else []
        dep["work_pool"] = {**dep.get("work_pool", {}), "name": pool}
        out.append(dep)
    return out + mosaiq_summaries(site, pool) + drills(site, pool)


def drills(site: Site, pool: str) -> list[dict[str, Any]]:
    """The monthly disaster-recovery drill, to the site's first Orthanc restore target (none
    without one: the drill needs a scratch Orthanc to read its copies back from)."""
    scratch = [alias for alias, t in site.restore_targets.items() if t.type == "orthanc"]
    return [{
        "name": f"{site.name.lower()}-dr-drill",
        "entrypoint": "flows/dr_drill.py:dr_drill",
        "description": f"Restores a patient treated last week to {scratch[0]} and diffs every "
                       f"object, monthly (site {site.name})",
        "tags": [f"site-{site.name}"],
        "parameters": {"site": site.name, "target": scratch[0]},
        "schedules": [schedule_for("dr-drill", site)],
        "concurrency_limit": {"limit": 1, "collision_strategy": "CANCEL_NEW"},
        "work_pool": {"name": pool}}] if scratch else []


def mosaiq_summaries(site: Site, pool: str) -> list[dict[str, Any]]:
    """For each Mosaiq source of the site, its treatment summary from SQL (a cross-check of the
    report): at the report's hour, and on demand for one MRN."""
    mosaiq = [alias for alias, src in site.sources.items() if isinstance(src, MosaiqSource)]
    return [{
        "name": f"{site.name.lower()}-mosaiq-summary" + (f"-{alias}" if len(mosaiq) > 1 else ""),
        "entrypoint": "flows/mosaiq_summary.py:mosaiq_summary",
        "description": f"Mosaiq's own account of each course (source {alias}), every morning "
                       f"(site {site.name})",
        "tags": [f"site-{site.name}"],
        "parameters": {"site": site.name, "source": alias},
        "schedules": [schedule_for("report", site)],
        "concurrency_limit": {"limit": 1, "collision_strategy": "CANCEL_NEW"},
        "work_pool": {"name": pool}} for alias in mosaiq]


def schedule_for(kind: str, site: Site) -> dict[str, Any]:
    """The deployment's schedule from the site's ``[SITE.schedules]`` table, in its timezone."""
    if kind == "incremental":
        return {"interval": site.schedules.incremental_minutes * 60, "timezone": site.timezone}
    return {"cron": getattr(site.schedules, kind.replace("-", "_")), "timezone": site.timezone}


def prefect_file_for(sites: list[Site], pool: str, template: Path = PREFECT_FILE,
                     heartbeat: int | None = None) -> dict[str, Any]:
    """Every site's set of the per-site deployments, and once each of the others.

    With ``heartbeat`` (seconds), every deployment's runs emit a heartbeat that often (their
    environment says so, whatever the worker's says) and carry the tag crash-notice's sweep
    watches; the sweep is told the interval (``flows.crash_notice.mark_dead_runs``)."""
    spec = yaml.safe_load(template.read_text())
    per_site = [d for d in spec["deployments"] if "site" in d.get("parameters", {})]
    shared = [{**d, "work_pool": {**d.get("work_pool", {}), "name": pool}}
              for d in spec["deployments"] if d not in per_site]
    spec["deployments"] = [dep for site in sites
                           for dep in site_deployments(per_site, site, pool)] + shared
    if heartbeat:
        for dep in spec["deployments"]:
            dep["tags"] = [*dep.get("tags", []), HEARTBEAT_TAG]
            variables = dep["work_pool"].setdefault("job_variables", {})
            variables["env"] = {**variables.get("env", {}),
                                "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat)}
            if dep["name"] == "crash-notice":  # its sweep marks silent runs Crashed
                dep["parameters"] = {**dep.get("parameters", {}), "heartbeat_seconds": heartbeat}
    return spec


CRASH_AUTOMATION = "radonc-backup: mail the site about a crashed run"
ZOMBIE_AUTOMATION = "radonc-backup: mark a run whose machine died Crashed"


def heartbeat_seconds() -> int | None:
    """How often the deployments' runs will send a heartbeat: the register step's own
    ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` (Prefect's default 180 s; at least 30), or None when
    heartbeats are off."""
    from prefect.settings import get_current_settings

    return get_current_settings().flows.heartbeat_frequency


def remove_zombie_automation() -> bool:
    """Delete the mark-Crashed automation an earlier version created: its trigger sometimes saw
    a run's last heartbeat after the run's Completed event and then tried to mark the finished
    run Crashed (a scheduler test saw it, on PostgreSQL too). crash-notice's sweep reads the
    heartbeats itself instead. True when one was deleted."""
    with get_client(sync_client=True) as client:
        old = client.read_automations_by_name(ZOMBIE_AUTOMATION)
        for automation in old:
            client.delete_automation(automation.id)
    return bool(old)


def ensure_crash_automation() -> None:
    """Every run of the scheduled flows that ends Crashed starts ``crash-notice/crash-notice``."""
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    from flows.crash_notice import BACKUP_FLOWS

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("crash-notice/crash-notice")
        for old in client.read_automations_by_name(CRASH_AUTOMATION):
            client.delete_automation(old.id)
        client.create_automation(AutomationCore(
            name=CRASH_AUTOMATION,
            description="Sends the failure e-mail of a run whose process died (its own "
                        "on_crashed hook cannot run then)",
            trigger=EventTrigger(
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related={"prefect.resource.role": "flow",
                               "prefect.resource.name": BACKUP_FLOWS},
                expect={"prefect.flow-run.Crashed"}, posture=Posture.Reactive, threshold=1),
            actions=[RunDeployment(source="selected", deployment_id=deployment.id,
                                   parameters={"flow_run_id": "{{ event.resource.id }}"})]))


def deploy(spec: dict[str, Any]) -> int:
    """``prefect deploy --all`` on the per-site file, from the checkout (entrypoints are
    relative to it). Its output is shown only when it fails: on success it advises, once per
    deployment, a worker command without the environment our workers need, beside ours."""
    with tempfile.TemporaryDirectory(prefix="radonc-deploy-") as tmp:
        path = Path(tmp) / "prefect.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all",
                               "--prefect-file", str(path)], cwd=PROJECT_ROOT,
                              capture_output=True, text=True)
    if done.returncode:
        sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done.returncode


def limit_site_parameter(names: list[str], known_sites: list[str]) -> int:
    """Let the ``site`` parameter of these deployments take only the config's sites, so a
    mistyped site is refused when the run is triggered (CLI or UI), naming the known ones."""
    changed = 0
    with get_client(sync_client=True) as client:
        for dep in client.read_deployments(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=names))):
            schema = copy.deepcopy(dep.parameter_openapi_schema or {})
            site = schema.get("properties", {}).get("site")
            if site is None:
                continue
            site["enum"] = known_sites
            site["description"] = ("Site name, a table of the sites file: one of "
                                   + ", ".join(known_sites))
            client.update_deployment(dep.id, DeploymentUpdate(
                parameter_openapi_schema=schema, enforce_parameter_schema=True))
            changed += 1
    return changed


def worker_command(pool: str, config: str | None) -> str:
    """What a worker needs in its environment, as one command line (the service unit in
    docs/operations.md sets the same)."""
    env = {"PREFECT_API_URL": os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api"),
           "RADONC_BACKUP_HOME": str(PROJECT_ROOT), CONFIG_ENV: str(config_path(config))}
    if os.environ.get(STATE_DIR_ENV):
        env[STATE_DIR_ENV] = os.environ[STATE_DIR_ENV]
    return (f"cd {shlex.quote(str(PROJECT_ROOT))} && "
            + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
            + f" {shlex.quote(sys.executable)} -m deployments.worker --pool {shlex.quote(pool)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.register", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="sites TOML (default: "
                        "$RADONC_BACKUP_CONFIG or config/environments.toml)")
    parser.add_argument("--site", action="append", dest="sites",
                        help="only this site (repeatable; default: every site of the config)")
    parser.add_argument("--pool", default=WORK_POOL, help=f"work pool (default {WORK_POOL})")
    parser.add_argument("--no-deploy", action="store_true",
                        help="create the pool and limits only")
    args = parser.parse_args(argv)
    try:
        known = site_names(args.config)
        chosen = args.sites or known
        sites = [load_site(name, args.config) for name in chosen]
        created = ensure_work_pool(args.pool)
        print(f"work pool {args.pool}: {'created' if created else 'exists'}")
        for name, size in register_limits(args.config, chosen).items():
            print(f"global concurrency limit {name}: {size} association(s)")
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.no_deploy:
        heartbeat = heartbeat_seconds()
        spec = prefect_file_for(sites, args.pool, heartbeat=heartbeat)
        code = deploy(spec)
        if code:
            return code
        names = [d["name"] for d in spec["deployments"]]
        limit_site_parameter(names, known)
        ensure_crash_automation()
        print("deployments: " + ", ".join(names))
        print(f"automation: {CRASH_AUTOMATION}")
        if remove_zombie_automation():
            print(f"automation removed: {ZOMBIE_AUTOMATION} (crash-notice's sweep does it)")
        if heartbeat:
            print(f"crash-notice sweep, every 10 minutes: a run without a heartbeat for "
                  f"{heartbeat * MISSED_HEARTBEATS} s (heartbeat every {heartbeat} s) is marked "
                  "Crashed and mailed")
        else:
            print("warning: PREFECT_FLOWS_HEARTBEAT_FREQUENCY is off: a run whose machine "
                  "dies will stay Running", file=sys.stderr)
    print("start a worker (see docs/operations.md for the service unit):\n  "
          + worker_command(args.pool, args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
