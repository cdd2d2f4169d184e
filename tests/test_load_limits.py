"""Load protection on the R&V: global association limits, and off-peak hours for image moves."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client

from demo.site import DemoSite
from flows.incremental_backup import incremental_backup
from flows.plan_context_backfill import plan_context_backfill
from radonc_backup.config import load_site, within_hours
from radonc_backup.ledger import Lane
from tasks.limits import ensure_rv_limits
from tests.test_backup_flows import at, course, ledger, push, run, uids

pytestmark = pytest.mark.usefixtures("prefect")
LANE = Lane("DEMO", "aria", "orthanc")
LIMIT = "dicom-RV_DEMO"


def set_source_key(site: DemoSite, line: str) -> None:
    cfg = Path(site.config_path)
    text = cfg.read_text()
    cfg.write_text(text.replace("max_find_results = 0\n", f"max_find_results = 0\n{line}\n", 1))


@pytest.fixture
def restore_limit() -> Iterator[None]:
    yield
    ensure_rv_limits(load_site("DEMO"), update=True)


def test_hours_cross_midnight() -> None:
    assert within_hours("19:00-07:00", at(0, 23)) and within_hours("19:00-07:00", at(0, 6, 59))
    assert not within_hours("19:00-07:00", at(0, 7)) and not within_hours("19:00-07:00", at(0, 12))
    assert within_hours("", at(0, 12)) and within_hours("08:00-17:00", at(0, 12))


def test_image_series_wait_for_off_peak_hours_and_are_not_dropped(
        make_site: Callable[..., DemoSite]) -> None:
    site = make_site()
    set_source_key(site, 'image_hours = "19:00-07:00"')
    c = course("OPS001", at(-1, 9), delivered=2)
    push(site, *c.all())

    state = run(incremental_backup, site, at(0, 14))
    assert state.is_completed(), state.message
    assert state.result()["plan_context"] == "Completed"
    held = site.backup.sop_instance_uids()
    assert held >= uids(*c.records, c.plan, c.rtstruct, c.dose)
    assert not held & uids(*c.images.instances), "no CT moves during the day"
    context_state, detail = ledger(site).at(LANE).contexts()[str(c.plan.SOPInstanceUID)]
    assert context_state == "deferred" and "off-peak hours 19:00-07:00" in detail

    state = run(plan_context_backfill, site, at(0, 20))
    assert state.is_completed(), state.message
    assert state.result()["moved"] == {"CT": len(c.images.instances)}
    assert site.backup.sop_instance_uids() >= uids(*c.images.instances)
    assert ledger(site).at(LANE).contexts()[str(c.plan.SOPInstanceUID)][0] == "complete"


def test_a_missing_rv_limit_stops_the_run_with_a_setup_error(
        make_site: Callable[..., DemoSite], restore_limit: None) -> None:
    site = make_site()
    c = course("OPS002", at(-1, 9), delivered=1)
    push(site, *c.records)
    with get_client(sync_client=True) as client:
        client.delete_global_concurrency_limit_by_name(LIMIT)

    state = run(incremental_backup, site, at(0, 14))
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert LIMIT in message and "python -m deployments.register" in message
    assert ledger(site).at(LANE).watermark() is None
    assert site.backup.instance_count() == 0


def test_a_run_waits_while_the_rv_has_no_free_association(
        make_site: Callable[..., DemoSite]) -> None:
    site = make_site()
    c = course("OPS003", at(-1, 9), delivered=2)
    push(site, *c.records)
    result: dict[str, Any] = {}
    with get_client(sync_client=True) as client:
        size = client.read_global_concurrency_limit_by_name(LIMIT).limit
        lease = client.increment_concurrency_slots_with_lease(
            [LIMIT], size, "concurrency", lease_duration=60).json()["lease_id"]
        runner = threading.Thread(target=lambda: result.update(
            state=run(incremental_backup, site, at(0, 14), backfill=False)))
        try:
            runner.start()
            time.sleep(4)
            assert runner.is_alive(), "the run must wait for a free association"
            assert site.backup.instance_count() == 0
        finally:
            client.release_concurrency_slots_with_lease(lease)
        runner.join(120)
    assert result["state"].is_completed(), result["state"].message
    assert site.backup.sop_instance_uids() == uids(*c.records)


def test_the_backfill_subflow_works_within_its_parent_runs_slots(
        make_site: Callable[..., DemoSite], restore_limit: None) -> None:
    """With a limit of exactly the backup's share, a subflow that asked for slots of its own
    would wait forever for its parent; it must run within the parent's hold instead."""
    site = make_site()
    set_source_key(site, "max_associations = 2")
    cfg = load_site("DEMO", site.config_path)
    assert cfg.settings.move_associations == 2
    ensure_rv_limits(cfg, update=True)
    c = course("OPS004", at(-1, 9), delivered=2)
    push(site, *c.all())
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(
        state=run(incremental_backup, site, at(0, 20))), daemon=True)
    runner.start()
    runner.join(120)
    assert not runner.is_alive(), "the backfill subflow waited for its own parent's slots"
    assert result["state"].is_completed(), result["state"].message
    assert result["state"].result()["plan_context"] == "Completed"
    assert site.backup.sop_instance_uids() == uids(*c.all())
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(LIMIT).active_slots == 0
