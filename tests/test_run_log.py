"""The per-site rotating log file: each run's lines, at the configured level, no patient names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from demo.site import DemoSite
from demo.synthetic import Patient, make_course
from flows.incremental_backup import incremental_backup
from tests.test_backup_flows import at, push, run

pytestmark = pytest.mark.usefixtures("prefect")


def test_runs_write_the_site_log_file_and_rotate_it(make_site: Callable[..., DemoSite]) -> None:
    site = make_site(settings={"log_max_mb": 0.004, "log_backups": 20, "log_level": "INFO"})
    c = make_course(Patient("LOG001", "Hidalgo^Persephone"), at(-1, 9), delivered=2, slices=2)
    push(site, *c.all())
    first = run(incremental_backup, site, at(0, 16))
    assert first.is_completed(), first.message
    site.rv.stop()
    failed = run(incremental_backup, site, at(0, 16, 10), backfill=False)
    assert failed.is_failed()

    log = site.workdir / "state" / "logs" / "DEMO.log"
    text = "".join(p.read_text() for p in sorted(log.parent.glob("DEMO.log*")))
    assert log.exists() and len(list(log.parent.glob("DEMO.log.*"))) >= 1, "rotated"
    assert "2 RT Records on RV_DEMO" in text and "1 complete" in text  # the run and its subflow
    assert "ERROR" in text and "RV_DEMO@127.0.0.1" in text
    assert "Hidalgo" not in text and "Persephone" not in text


def test_the_log_level_comes_from_the_site_config(make_site: Callable[..., DemoSite],
                                                  tmp_path: Path) -> None:
    site = make_site(settings={"log_level": "WARNING", "log_file": str(tmp_path / "site.log")})
    c = make_course(Patient("LOG002", "Quiet^Level"), at(-1, 9), delivered=1, slices=2)
    push(site, *c.records)
    assert run(incremental_backup, site, at(0, 16), backfill=False).is_completed()
    site.rv.stop()
    assert run(incremental_backup, site, at(0, 16, 10), backfill=False).is_failed()
    text = (tmp_path / "site.log").read_text()
    assert "INFO" not in text and "ERROR" in text
