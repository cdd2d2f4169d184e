"""Register RadOnc Backup with a Prefect server: work pool, R&V load limits, deployments.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m deployments.register [--config FILE]

1. creates the process work pool (``radonc-backup``) if it is missing;
2. creates or resizes, for every DICOM source of every site in the config, the global
   concurrency limit that caps associations with that R&V AE (``max_associations``);
3. runs ``prefect deploy --all`` on ``prefect.yaml`` (skip with ``--no-deploy``).

Run it again after changing the config or ``prefect.yaml``; it only creates or updates.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.workers.process import ProcessWorker

from radonc_backup.config import PROJECT_ROOT, load_site, site_names
from radonc_backup.errors import BackupError
from tasks.limits import ensure_rv_limits

WORK_POOL = "radonc-backup"


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


def register_limits(config: str | None, sites: list[str] | None) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for name in sites or site_names(config):
        sizes.update(ensure_rv_limits(load_site(name, config), update=True))
    return sizes


def deploy_all() -> int:
    return subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
                          cwd=PROJECT_ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.register", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="sites TOML (default: "
                        "$RADONC_BACKUP_CONFIG or config/environments.toml)")
    parser.add_argument("--site", action="append", dest="sites",
                        help="only this site's limits (repeatable; default: every site)")
    parser.add_argument("--pool", default=WORK_POOL, help=f"work pool (default {WORK_POOL})")
    parser.add_argument("--no-deploy", action="store_true",
                        help="create the pool and limits only")
    args = parser.parse_args(argv)
    try:
        created = ensure_work_pool(args.pool)
        print(f"work pool {args.pool}: {'created' if created else 'exists'}")
        for name, size in register_limits(args.config, args.sites).items():
            print(f"global concurrency limit {name}: {size} association(s)")
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if args.no_deploy else deploy_all()


if __name__ == "__main__":
    sys.exit(main())
