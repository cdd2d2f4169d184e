"""Fixtures: a Prefect test harness for the session, and real Orthanc pairs per test."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from datetime import date, timedelta
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

# Every temporary file of the session, ours and those of the servers and tools it starts
# (TMPDIR is inherited), in one folder: removed at exit when the session passed, kept for a look
# when it failed. A run leaves nothing else in /tmp.
_SESSION_TMP = tempfile.mkdtemp(prefix="radonc-tests-")
os.chmod(_SESSION_TMP, 0o711)  # PostgreSQL runs as its own user and must reach its folder
os.environ["TMPDIR"] = tempfile.tempdir = _SESSION_TMP
_PASSED: list[bool] = []


def _remove_session_tmp() -> None:  # registered first: runs after Prefect's own exit hooks
    if _PASSED:
        shutil.rmtree(_SESSION_TMP, ignore_errors=True)
    else:
        print(f"test files kept in {_SESSION_TMP}", file=sys.stderr)


atexit.register(_remove_session_tmp)
_PREFECT_TMP = tempfile.mkdtemp(prefix="radonc-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_TMP)
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(Path(_PREFECT_TMP) / "results")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from aiosmtpd.controller import Controller  # noqa: E402

from demo.orthanc import free_port  # noqa: E402
from demo.site import DemoSite, start_demo_site  # noqa: E402
from demo.synthetic import Course, to_bytes  # noqa: E402

FAST_RETRIES = {"retries": 2, "retry_backoff_seconds": 0.2, "retry_jitter_factor": 0,
                "verify_timeout": 0.5, "acse_timeout": 5, "dimse_timeout": 20,
                "network_timeout": 10, "connection_timeout": 3}


SERVER_FIXTURES = {"make_site", "prefect", "scheduling_server", "registered_server",
                   "prefect_postgres", "postgres"}
"""Fixtures that start Orthanc, Prefect or PostgreSQL: a test using one is in the slow tier."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first (a stable sort): spread over pytest-xdist's processes, the longest
    ones start at once instead of holding the end of the run.

    And the ``xdist_group`` of a test into its node ID, which is how ``--dist loadgroup`` sends
    a group to one process: pytest-xdist 3.8 sets ``item._nodeid``, which pytest 9 no longer
    reads (a group of three ran on three processes), so it is done here."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    for item in items:  # real servers make a test slow, whether or not it says so
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        if groups and "@" not in item.nodeid:
            from _pytest.nodeid import coerce_node_id  # pytest 9 keeps the ID structured

            grouped = f"{item.nodeid}@{'_'.join(groups)}"
            item._id = coerce_node_id(grouped)  # type: ignore[attr-defined]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if exitstatus == 0:
        _PASSED.append(True)


@pytest.fixture(scope="session")
def prefect() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    from radonc_backup.config import load_site
    from tasks.limits import ensure_rv_limits

    # 180 s: on a loaded machine (other test processes, a build) the temporary server has been
    # seen to need more than a minute to answer.
    with prefect_test_harness(server_startup_timeout=180):
        ensure_rv_limits(load_site("DEMO"))  # what deployments.register does on a real server
        yield


@pytest.fixture
def make_site(tmp_path: Path) -> Iterator[Callable[..., DemoSite]]:
    """Start an R&V stand-in and a backup Orthanc; stopped after the test."""
    started: list[DemoSite] = []

    def factory(**kwargs: Any) -> DemoSite:
        settings = {**FAST_RETRIES, **kwargs.pop("settings", {})}
        site = start_demo_site(tmp_path / f"site{len(started)}", settings=settings, **kwargs)
        started.append(site)
        return site

    yield factory
    for site in started:
        site.stop()


def load(site: DemoSite, *courses: Course, records_only: bool = False) -> int:
    objects = [ds for c in courses for ds in (c.records if records_only else c.all())]
    return site.rv.upload([to_bytes(ds) for ds in objects])


class PrefectDatabases:
    """One PostgreSQL cluster for the session's Prefect servers; ``new()`` makes a database for
    one server the way docs/operations.md does (deployments.prefect_database) and returns the
    server's connection URL."""

    def __init__(self) -> None:
        from tests.postgres_server import PostgresServer

        self.cluster = PostgresServer(Path(tempfile.mkdtemp(prefix="prefect-pg-")),
                                      user="pgadmin", password="pg-admin-pw", database="scratch")
        self.made = 0
        self.admin_env = {"PGPASSWORD": self.cluster.password}

    def new(self) -> str:
        from deployments.prefect_database import connection_url, ensure_database

        name = f"prefect_{self.made}"
        self.made += 1
        password = ensure_database(f"{name}_user", name, self.cluster.admin_url(),
                                   self.admin_env)
        assert password is not None
        return connection_url(f"{name}_user", password, "127.0.0.1", self.cluster.port, name)


@pytest.fixture(scope="session")
def prefect_postgres() -> Iterator[PrefectDatabases]:
    databases = PrefectDatabases()
    yield databases
    databases.cluster.remove()


@pytest.fixture(scope="module")
def registered_server(tmp_path_factory: pytest.TempPathFactory,
                      prefect_postgres: PrefectDatabases) -> Iterator[Any]:
    """One real server on PostgreSQL (scheduler off) for a module's tests, registered once for
    site DEMO with the deployments' runs sending heartbeats every 30 s (the least Prefect
    allows: a dead run is marked Crashed 90 s after its last); ``registered`` is what the
    register step printed. Tests take it through a fixture that calls ``reset()``."""
    from tests.prefect_procs import Server, register_config

    srv = Server(tmp_path_factory.mktemp("prefect-server"), database_url=prefect_postgres.new())
    srv.env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = "30"
    srv.registered = register_config(srv, Path(__file__).resolve().parent.parent / "config"
                                     / "environments.toml", "DEMO")
    del srv.env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]  # the runs have it from the deployments
    srv.keep_env()
    yield srv
    srv.stop()


@pytest.fixture
def scheduling_server(tmp_path: Path, prefect_postgres: PrefectDatabases) -> Iterator[Any]:
    """A real `prefect server start` as production runs it: on PostgreSQL, every service on, the
    scheduler too."""
    from tests.prefect_procs import Server

    home = tmp_path / "prefect-server"
    home.mkdir()
    srv = Server(home, scheduler=True, database_url=prefect_postgres.new())
    yield srv
    srv.stop()


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield inbox, port
    controller.stop()


def add_notify(site: DemoSite, port: int) -> None:
    cfg = Path(site.config_path)
    cfg.write_text(cfg.read_text() + (
        f'\n[DEMO.notify]\nsmtp_host = "127.0.0.1"\nsmtp_port = {port}\n'
        'sender = "radonc-backup@clinic.test"\n'
        'recipients = ["physics-oncall@clinic.test", "it@clinic.test"]\n'
        'ui_url = "http://prefect.clinic.test:4200"\n'))


def missed(site: DemoSite, source_uids: set[str], state_dir: Path | None = None) -> tuple[int, int]:
    """The numbers every fault test holds at zero after its recovery runs: instances on the
    source that are not verified in the backup (in the ledger and present), and ledger rows
    verified whose instance the backup does not hold."""
    from radonc_backup.ledger import Ledger

    ledger = Ledger.for_state_dir(state_dir or site.workdir / "state")
    held = site.backup.sop_instance_uids()
    verified: set[str] = set()
    for lane in ledger.lanes():
        for kind in ("record", "context"):
            rows = ledger.at(lane).rows("verified", kind=kind)
            verified |= {r.ref.sop_instance_uid for r in rows}
    not_safe = {u for u in source_uids if u not in held or u not in verified}
    false_verified = {u for u in verified if u not in held}
    return len(not_safe), len(false_verified)


def report_truth(records: Iterable[Dataset], end: date, days: int = 7,
                 ) -> set[tuple[str, str, int]]:
    """(PatientID, PlanUID, current fraction) of every course with a session in the ``days``
    calendar days ending ``end``, read straight from the source's records: the rows the
    treatment report must hold. The current fraction counts every session up to ``end``."""
    start = end - timedelta(days=days - 1)
    courses: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for ds in records:
        day = str(ds.get("TreatmentDate", ""))
        plans = ds.get("ReferencedRTPlanSequence") or []
        plan = str(plans[0].ReferencedSOPInstanceUID) if plans else ""
        beams = ds.get("TreatmentSessionBeamSequence") or \
            ds.get("TreatmentSessionIonBeamSequence") or []
        fraction = max((int(b.CurrentFractionNumber) for b in beams
                        if b.get("CurrentFractionNumber") not in (None, "")), default=0)
        if day and day <= f"{end:%Y%m%d}":
            courses.setdefault((str(ds.PatientID), plan), []).append((day, fraction))
    return {(pid, plan, max(f for _, f in sessions))
            for (pid, plan), sessions in courses.items()
            if any(day >= f"{start:%Y%m%d}" for day, _ in sessions)}


def report_rows_missing(site: DemoSite, records: Iterable[Dataset], end: date) -> int:
    """Rows of the truth that the treatment report, run over the backup, lacks or gets wrong."""
    import pandas as pd

    from flows.treatment_report import treatment_report

    out = site.workdir / f"fault-report-{end}.csv"
    treatment_report(site="DEMO", config=str(site.config_path), end_date=end, out=str(out),
                     return_state=True)  # an unreadable record fails the run: the CSV is read
    table = pd.read_csv(out, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    rows = {(r.PatientID, r.PlanUID, int(r.CurrentFraction or 0))
            for r in table.itertuples()}
    truth = report_truth(records, end)
    assert truth, "no course treated in the report's window: the third number would prove nothing"
    return len(truth - rows)


def three_numbers(site: DemoSite, records: list[Dataset], end: date,
                  others: Iterable[Dataset] = ()) -> tuple[int, int, int]:
    """What every fault test holds at zero after its recovery runs: instances on the source
    not verified in the backup, ledger rows verified without the instance in the backup, and
    report rows missing against the truth (``records``: the RT Records on the source;
    ``others``: further objects, e.g. plan context, that must be safe too)."""
    source = {str(ds.SOPInstanceUID) for ds in [*records, *others]}
    return (*missed(site, source), report_rows_missing(site, records, end))
