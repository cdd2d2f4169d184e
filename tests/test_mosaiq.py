"""Mosaiq as a source: a Mosaiq-shaped database read through unixODBC and Debian's SQLite3 ODBC
driver (a real driver, as production's SQL Server one), records in a real backup Orthanc.

The database holds what Mosaiq holds and what tripped others: several patients (one with a
non-ASCII name), several fields a session, a prescription change (a new Site row mid-course), a
field whose later version was renamed (deliveries keep the name they were given under), a
delivered field with a NULL meterset, and a row outside the window.
"""

from __future__ import annotations

import sqlite3
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any
from datetime import datetime
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread

from demo.mosaiq_db import SCHEMA
from demo.site import DemoSite
from flows.incremental_backup import incremental_backup
from flows.nightly_backup import nightly_backup
from radonc_backup.config import load_site
from radonc_backup.errors import ConfigError
from radonc_backup.ledger import Lane, Ledger
from tests.conftest import report_rows_missing
from tests.postgres_server import PASSWORD, PostgresServer
from tests.test_backup_flows import DAY, at, run

pytestmark = pytest.mark.usefixtures("prefect")



def ts(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}"


def mosaiq_database(path: Path) -> dict[str, set[tuple[str, int]]]:
    """The database in SQLite at ``path``; see ``fill``."""
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    expected = fill(db, ts)
    db.close()
    return expected


def fill(db: Any, when: Callable[[datetime], object]) -> dict[str, set[tuple[str, int]]]:
    """Write the patients through ``db`` (a DB-API connection whose tables exist; ``when``
    turns a moment into what its driver binds). Returns, per MRN, the (TreatmentDate,
    fraction) sessions delivered in the window yesterday-today."""
    cursor = db.cursor()
    cursor.executemany("INSERT INTO Patient VALUES (?, ?, ?)",
                   [(1, "Müller", "Zoë"), (2, "Nguyen", "Anh"), (3, "Smith", "Jo")])
    cursor.executemany("INSERT INTO Ident VALUES (?, ?)",
                   [(1, "MQ0001"), (2, "MQ0002"), (3, "MQ0003")])
    cursor.executemany("INSERT INTO Site VALUES (?, ?, ?, ?, ?, ?, ?)", [
        (10, 10, 1, "Prostate", 7800.0, 39, 0),
        (20, 20, 2, "Breast L", 4005.0, 15, 1),  # the prescription before its change
        (21, 20, 2, "Breast L boost", 5005.0, 20, 0),  # ... and after
        (30, 30, 3, "Lung R", 6000.0, 30, 0)])
    cursor.executemany("INSERT INTO TxField VALUES (?, ?, ?, ?, ?)", [
        (101, 10, "AP old name", "X", 1), (105, 10, "AP", "X", 0), (102, 10, "PA", "X", 0),
        (201, 20, "Tangent med", "Photon", 0), (202, 20, "Tangent lat", None, 0),
        (301, 30, "Arc 1", "Electron", 0)])
    rows = [
        # patient 1: yesterday fraction 5 with the field's old version, today fraction 6
        (1, 101, 10, at(-1, 8, 0), 5, 120.5), (1, 102, 10, at(-1, 8, 3), 5, 118.0),
        (1, 105, 10, at(0, 8, 0), 6, 120.5), (1, 102, 10, at(0, 8, 3), 6, None),
        # patient 2: yesterday the last fraction of the old prescription, today the new one
        (2, 201, 20, at(-1, 9, 0), 15, 210.0), (2, 202, 20, at(-1, 9, 4), 15, 205.0),
        (2, 201, 21, at(0, 9, 0), 1, 210.0), (2, 202, 21, at(0, 9, 4), 1, 205.0),
        # patient 3: today only; and a session 70 days ago, before a new ledger's catch-up
        (3, 301, 30, at(0, 10, 0), 12, 400.0), (3, 301, 30, at(-70, 10, 0), 1, 400.0)]
    cursor.executemany("INSERT INTO Dose_Hst (DH_ID, Pat_ID1, FLD_ID, SIT_ID, Tx_DtTm, "
                   "Fractions_Tx, Meterset) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   [(n, p, f, s, when(t), k, m) for n, (p, f, s, t, k, m) in enumerate(rows)])
    db.commit()
    sessions: dict[str, set[tuple[str, int]]] = {}
    for p, _, _, t, n, _ in rows:
        if t >= at(-1, 0):
            sessions.setdefault(f"MQ000{p}", set()).add((f"{t:%Y%m%d}", n))
    return sessions


UNDATED = (99, 3, 301, 30, None, 11, 400.0)
"""A delivered field Mosaiq holds without Tx_DtTm (patient 3's fraction 11)."""


def add_undated(db: Any) -> None:
    db.cursor().execute("INSERT INTO Dose_Hst VALUES (?, ?, ?, ?, ?, ?, ?)", UNDATED)
    db.commit()


def add_mosaiq(site: DemoSite, database: Path | str, **settings: str) -> None:
    """The Mosaiq source: ``database`` is a SQLite file or a whole ODBC connection string."""
    from tasks.limits import ensure_rv_limits

    odbc = database if isinstance(database, str) else \
        f"Driver={{SQLite3}};Database={database}"
    cfg = Path(site.config_path)
    extra = "".join(f'{k} = "{v}"\n' for k, v in settings.items())
    cfg.write_text(cfg.read_text() + f'\n[DEMO.sources.mosaiq]\ntype = "mosaiq"\n'
                                     f'odbc = "{odbc}"\n{extra}')
    ensure_rv_limits(load_site("DEMO", str(cfg)))


def backup_records(site: DemoSite) -> list:
    with site.backup.rest() as client:
        return [dcmread(BytesIO(client.get(f"/instances/{i}/file").content))
                for i in client.get("/instances").json()]


def test_a_mosaiq_site_backs_up_its_sessions_as_rt_records(
        make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    site = make_site()
    expected = mosaiq_database(tmp_path / "mosaiq.db")
    add_mosaiq(site, tmp_path / "mosaiq.db")

    state = run(incremental_backup, site, at(0, 16), source="mosaiq")
    assert state.is_completed(), state.message
    records = backup_records(site)
    got: dict[str, set[tuple[str, int]]] = {}
    for ds in records:
        fractions = {int(b.CurrentFractionNumber) for b in ds.TreatmentSessionBeamSequence}
        assert len(fractions) == 1
        got.setdefault(str(ds.PatientID), set()).add((str(ds.TreatmentDate), fractions.pop()))
    assert got == expected, "one record per patient per session, nothing outside the window"
    rows = Ledger.for_state_dir(site.workdir / "state").at(Lane("DEMO", "mosaiq", "orthanc"))
    assert {r.state for r in rows.rows()} == {"verified"} and len(rows.rows()) == len(records)

    by_day = {(str(ds.PatientID), str(ds.TreatmentDate)): ds for ds in records}
    first = by_day[("MQ0001", f"{at(-1, 0):%Y%m%d}")]
    assert str(first.PatientName) == "Müller^Zoë"
    assert [b.BeamName for b in first.TreatmentSessionBeamSequence] == ["AP old name", "PA"]
    today = by_day[("MQ0001", f"{at(0, 0):%Y%m%d}")]
    assert [b.BeamName for b in today.TreatmentSessionBeamSequence] == ["AP", "PA"]
    assert "DeliveredPrimaryMeterset" not in today.TreatmentSessionBeamSequence[1], \
        "a NULL meterset stays empty, never invented"
    assert int(by_day[("MQ0002", f"{at(0, 0):%Y%m%d}")].NumberOfFractionsPlanned) == 20
    assert int(by_day[("MQ0002", f"{at(-1, 0):%Y%m%d}")].NumberOfFractionsPlanned) == 15

    for ds in records:  # every object we made passes the standard's own checker
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [line for line in (out.stdout + out.stderr).splitlines()
                  if line.startswith("Error")]
        assert not errors, errors

    with sqlite3.connect(tmp_path / "mosaiq.db") as db:  # a delivery Mosaiq holds undated
        add_undated(db)
    again = run(incremental_backup, site, at(0, 16, 10), source="mosaiq")
    assert again.is_completed(), again.message
    assert len(backup_records(site)) == len(records), "a rerun makes the same objects"
    assert_nightly_backs_up_the_undated_field(site, records, tmp_path)
    assert report_rows_missing(site, records, DAY.date()) == 0

    from flows.validation_sweep import validation_sweep

    swept = run(validation_sweep, site, at(1, 8), start_date=at(-1, 0).date(),
                end_date=DAY.date(), source="mosaiq", depth="content",
                out=str(tmp_path / "sweep.csv"))
    assert swept.is_completed(), swept.message  # Mosaiq's SQL and the backup agree, both ways
    assert swept.result()["records_on_source"] == len(records)
    assert (tmp_path / "sweep.csv").read_text(encoding="utf-8-sig").count("\n") == 1

    from flows.plan_context_backfill import plan_context_backfill

    context = plan_context_backfill(site="DEMO", source="mosaiq", config=str(site.config_path),
                                    return_state=True)
    assert context.is_failed() and "is a Mosaiq database" in str(context.message)


def assert_nightly_backs_up_the_undated_field(site: DemoSite, records: list,
                                              tmp_path: Path) -> None:
    """No window selects a field without Tx_DtTm: the nightly asks for them, backs each up as
    a record with an empty TreatmentDate (Type 2) and names the patient in its summary."""
    nightly = run(nightly_backup, site, at(1, 2), days=2, source="mosaiq")
    assert nightly.is_completed(), nightly.message
    notes = " ".join(nightly.result()["peer_notes"])
    assert "1 delivered field(s) have no treatment date" in notes and "MQ0003" in notes, notes
    known = {str(ds.SOPInstanceUID) for ds in records}
    new = [ds for ds in backup_records(site) if str(ds.SOPInstanceUID) not in known]
    assert [(str(ds.PatientID), str(ds.TreatmentDate)) for ds in new] == [("MQ0003", "")]
    beam = new[0].TreatmentSessionBeamSequence[0]
    assert (int(beam.CurrentFractionNumber), float(beam.DeliveredPrimaryMeterset)) == (11, 400)
    path = tmp_path / "undated.dcm"
    new[0].save_as(path, enforce_file_format=True)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert all("TreatmentControlPoint" in line for line in errors), \
        "the only departure from the IOD: the control points' dates, which Mosaiq lacks"
    lane = Ledger.for_state_dir(site.workdir / "state").at(Lane("DEMO", "mosaiq", "orthanc"))
    assert lane.states([str(new[0].SOPInstanceUID)]) == {str(new[0].SOPInstanceUID): "verified"}


def test_mosaiq_errors_are_one_line_naming_site_and_source(
        make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    from radonc_backup.mosaiq import connect, read_fields

    site = make_site()
    mosaiq_database(tmp_path / "mosaiq.db")
    cfg = Path(site.config_path)
    base = cfg.read_text()
    cases = {
        "no such driver": ('odbc = "Driver={No Such Driver};Database=x"\n', "driver"),
        "bad SQL": (f'odbc = "Driver={{SQLite3}};Database={tmp_path / "mosaiq.db"}"\n'
                    'sessions_query = "SELECT * FROM Dose_History WHERE ? < ?"\n', "SQL error"),
        "missing column": (f'odbc = "Driver={{SQLite3}};Database={tmp_path / "mosaiq.db"}"\n'
                           'sessions_query = "SELECT Pat_ID1 AS pat_id1 FROM Dose_Hst WHERE '
                           'Tx_DtTm >= ? AND Tx_DtTm < ?"\n', "no column mrn"),
    }
    for name, (keys, expected) in cases.items():
        cfg.write_text(base + f'\n[DEMO.sources.mosaiq]\ntype = "mosaiq"\n{keys}')
        loaded = load_site("DEMO", str(cfg))
        source = loaded.sources["mosaiq"]
        with pytest.raises(ConfigError) as raised:
            conn = connect(loaded, "mosaiq", source)  # type: ignore[arg-type]
            read_fields(conn, loaded, "mosaiq", source, at(-1, 0), at(0, 16))  # type: ignore
        message = str(raised.value)
        assert "site DEMO" in message and "mosaiq" in message and expected in message, (name,
                                                                                         message)
        assert len(message.splitlines()) == 1, message


def test_the_mosaiq_summary_counts_each_course_and_refuses_an_injected_mrn(
        make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    import pandas as pd

    from flows.mosaiq_summary import mosaiq_summary

    site = make_site()
    database = tmp_path / "mosaiq.db"
    mosaiq_database(database)
    with sqlite3.connect(database) as db:
        add_undated(db)
    add_mosaiq(site, database)

    def summary(**params: object) -> pd.DataFrame:
        out = tmp_path / f"summary-{len(list(tmp_path.glob('summary-*')))}.csv"
        state = mosaiq_summary(site="DEMO", source="mosaiq", config=str(site.config_path),
                               out=str(out), return_state=True, **params)
        assert state.is_completed(), state.message
        return pd.read_csv(out, dtype=str, keep_default_na=False, encoding="utf-8-sig")

    window = summary(start_date=at(-1, 0).date(), end_date=DAY.date())
    rows = {(r.PatientID, r.Site): r for r in window.itertuples()}
    assert set(rows) == {("MQ0001", "Prostate"), ("MQ0002", "Breast L"),
                         ("MQ0002", "Breast L boost"), ("MQ0003", "Lung R")}
    lung = rows[("MQ0003", "Lung R")]  # the whole course: last month's session, the undated
    assert (lung.FractionsDelivered, lung.FirstTreatment) == ("3", f"{at(-70, 0):%Y-%m-%d}")
    assert (lung.PrescribedDoseGy, lung.FractionsPlanned) == ("60.0", "30")
    assert rows[("MQ0001", "Prostate")].PatientName == "Müller^Zoë"
    assert rows[("MQ0001", "Prostate")].FractionsDelivered == "2"

    one = summary(mrn="MQ0002")
    assert sorted(one.Site) == ["Breast L", "Breast L boost"]

    before = sqlite3.connect(database).execute("SELECT COUNT(*) FROM Dose_Hst").fetchone()
    for attack in ("MQ0001' OR '1'='1", "x'; DROP TABLE Dose_Hst; --"):
        assert summary(mrn=attack).empty, attack
    assert sqlite3.connect(database).execute("SELECT COUNT(*) FROM Dose_Hst").fetchone() \
        == before


def test_a_query_failing_half_way_stores_nothing_and_marks_nothing(
        make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    """The SELECT fails part way through its rows (SQLite's integer overflow on patient 3's
    rows, which come last; a connection lost mid-fetch fails the same way): the run fails in
    one line naming the source, nothing is staged or stored, the ledger holds no row and the
    watermark does not move."""
    from radonc_backup.mosaiq import SESSIONS_QUERY, staging_dir

    site = make_site()
    mosaiq_database(tmp_path / "mosaiq.db")
    failing = SESSIONS_QUERY.replace(
        "d.Meterset AS meterset",
        "d.Meterset AS meterset, CASE WHEN d.Pat_ID1 = 3 THEN abs(-9223372036854775807 - 1) "
        "ELSE 0 END AS boom").replace("\n", " ")
    add_mosaiq(site, tmp_path / "mosaiq.db", sessions_query=failing)
    state = run(incremental_backup, site, at(0, 16), source="mosaiq")
    assert state.is_failed()
    assert "source mosaiq" in str(state.message) and "SQL error" in str(state.message)
    assert site.backup.sop_instance_uids() == set()
    lane = Ledger.for_state_dir(site.workdir / "state").at(Lane("DEMO", "mosaiq", "orthanc"))
    assert lane.rows() == [] and lane.watermark() is None
    staged = staging_dir(load_site("DEMO", str(site.config_path)), "mosaiq")
    assert not staged.exists() or not any(staged.iterdir())


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    """A Mosaiq-shaped database in a real PostgreSQL server, reached through Debian's
    psqlODBC driver: a second SQL dialect, and a server that can refuse a login or be down."""
    import pyodbc

    server = PostgresServer(Path(tempfile.mkdtemp(prefix="radonc-pg-")))
    try:
        db = pyodbc.connect(f"{server.odbc()};PWD={PASSWORD}")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        db.commit()
        db.close()
        yield server
    finally:
        server.remove()


def fill_postgres(server: PostgresServer) -> dict[str, set[tuple[str, int]]]:
    import pyodbc

    db = pyodbc.connect(f"{server.odbc()};PWD={PASSWORD}")
    try:
        return fill(db, lambda moment: moment)
    finally:
        db.close()


def test_on_postgresql_the_same_query_backs_up_the_same_sessions_and_a_refused_login_is_named(
        make_site: Callable[..., DemoSite], postgres: PostgresServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The one query in a second dialect (PostgreSQL through psqlODBC, as production's SQL
    Server through Microsoft's driver): the same records. Then the password is wrong: the run
    fails at once (a refused login is not retried) in one line naming site, source and where
    the password comes from, without the password; nothing stored, the watermark unmoved."""
    from tests.test_backup_flows import task_run_counts

    site = make_site(settings={"retries": 3})
    expected = fill_postgres(postgres)
    add_mosaiq(site, postgres.odbc(), password_env="MOSAIQ_PASSWORD")
    monkeypatch.setenv("MOSAIQ_PASSWORD", PASSWORD)
    state = run(incremental_backup, site, at(0, 16), source="mosaiq")
    assert state.is_completed(), state.message
    got = {(str(ds.PatientID), (str(ds.TreatmentDate),
                                int(ds.TreatmentSessionBeamSequence[0].CurrentFractionNumber)))
           for ds in backup_records(site)}
    assert got == {(mrn, s) for mrn, sessions in expected.items() for s in sessions}
    assert {str(ds.PatientName) for ds in backup_records(site)} >= {"Müller^Zoë"}

    lane = Ledger.for_state_dir(site.workdir / "state").at(Lane("DEMO", "mosaiq", "orthanc"))
    watermark = lane.watermark()
    held = site.backup.sop_instance_uids()
    monkeypatch.setenv("MOSAIQ_PASSWORD", "not-the-password")
    refused = run(incremental_backup, site, at(0, 16, 10), source="mosaiq")
    message = str(refused.message)
    assert refused.is_failed(), message
    assert "site DEMO" in message and "source mosaiq" in message and "login refused" in message
    assert "$MOSAIQ_PASSWORD" in message and "not-the-password" not in message, message
    assert len(message.splitlines()) == 1, message
    assert task_run_counts(refused.state_details.flow_run_id)["read-mosaiq-sessions"] == 1
    assert site.backup.sop_instance_uids() == held and lane.watermark() == watermark


def test_a_mosaiq_database_that_is_down_is_retried_and_then_named(
        make_site: Callable[..., DemoSite], postgres: PostgresServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Down for the whole run: each attempt the site allows, then one line saying the database
    is down, nothing stored, the watermark unmoved. Down at the start and up a moment later
    (a network blip, a failover): a retry reads it and the run completes."""
    from tests.test_backup_flows import task_run_counts

    site = make_site(settings={"retries": 4, "retry_backoff_seconds": 1})
    expected = fill_postgres(postgres)
    add_mosaiq(site, postgres.odbc(), password_env="MOSAIQ_PASSWORD", login_timeout="5")
    monkeypatch.setenv("MOSAIQ_PASSWORD", PASSWORD)
    postgres.stop()

    down = run(incremental_backup, site, at(0, 16), source="mosaiq")
    message = str(down.message)
    assert down.is_failed(), message
    assert "site DEMO" in message and "database down or unreachable" in message, message
    assert len(message.splitlines()) == 1, message
    assert task_run_counts(down.state_details.flow_run_id)["read-mosaiq-sessions"] == 4
    lane = Ledger.for_state_dir(site.workdir / "state").at(Lane("DEMO", "mosaiq", "orthanc"))
    assert site.backup.sop_instance_uids() == set() and lane.watermark() is None

    # The database comes back just after the first attempt failed (not on a timer: on a busy
    # machine the run's first attempt may start later than any fixed delay).
    import radonc_backup.mosaiq as mosaiq_module

    real_connect, comes_back = mosaiq_module.connect, []

    def connect_then_come_back(*args: object, **kwargs: object) -> object:
        try:
            return real_connect(*args, **kwargs)  # type: ignore[arg-type]
        except Exception:
            if not comes_back:
                comes_back.append(threading.Thread(target=postgres.start))
                comes_back[0].start()
            raise

    monkeypatch.setattr(mosaiq_module, "connect", connect_then_come_back)
    try:
        up = run(incremental_backup, site, at(0, 16), source="mosaiq")
    finally:
        for thread in comes_back:
            thread.join()
    assert up.is_completed(), up.message
    assert task_run_counts(up.state_details.flow_run_id)["read-mosaiq-sessions"] >= 2
    assert len(site.backup.sop_instance_uids()) == sum(len(s) for s in expected.values())
    assert {r.state for r in lane.rows()} == {"verified"} and lane.watermark() is not None


def dciodvfy_problems(records: list, folder: Path) -> list[str]:
    """Every Error line, and the warnings the IOD lets us fix, dciodvfy prints for ``records``."""
    fixable = ("Study Date", "Study Time", "Study ID", "Series Number")
    problems = []
    for ds in records:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        problems += [f"{ds.PatientID}: {line}" for line in (out.stdout + out.stderr).splitlines()
                     if line.startswith("Error") or (line.startswith("Warning") and any(
                         line.endswith(f) for f in fixable))]
    return problems


def test_sessions_split_across_runs_and_midnight_are_whole_and_two_prescriptions_two_rows(
        make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    """MQ0004 is treated for two prescriptions at once (Prostate at fraction 5 of 39, Nodes at
    fraction 1 of 25). The Nodes fraction's first field is delivered at 23:58, its second at
    00:03, with a run between; Prostate fraction 5's second arc after the run that backed up
    its first. The latest record of each fraction in the backup holds both fields, the earlier
    one is kept and marked superseded in the ledger; the report has one row per prescription,
    each agreeing with mosaiq-summary."""
    import pandas as pd

    from flows.mosaiq_summary import mosaiq_summary
    from flows.treatment_report import treatment_report

    site = make_site()
    database = tmp_path / "mosaiq.db"
    db = sqlite3.connect(database)
    db.executescript(SCHEMA)
    db.execute("INSERT INTO Patient VALUES (4, 'Åberg', 'Li')")
    db.execute("INSERT INTO Ident VALUES (4, 'MQ0004')")
    db.executemany("INSERT INTO Site VALUES (?, ?, ?, ?, ?, ?, ?)", [
        (40, 40, 4, "Prostate", 7800.0, 39, 0), (41, 41, 4, "Nodes", 5000.0, 25, 0)])
    db.executemany("INSERT INTO TxField VALUES (?, ?, ?, ?, ?)", [
        (401, 40, "Arc A", "X", 0), (402, 40, "Arc B", "X", 0),
        (411, 41, "Nodes AP", "X", 0), (412, 41, "Nodes PA", "X", 0)])

    def deliver(field: int, sit: int, when: datetime, fraction: int, mu: float) -> None:
        db.execute("INSERT INTO Dose_Hst (Pat_ID1, FLD_ID, SIT_ID, Tx_DtTm, Fractions_Tx, "
                   "Meterset) VALUES (4, ?, ?, ?, ?, ?)", (field, sit, ts(when), fraction, mu))
        db.commit()

    for n in range(1, 5):  # Prostate fractions 1-4, both arcs, the days before
        deliver(401, 40, at(n - 5, 8, 0), n, 150.0)
        deliver(402, 40, at(n - 5, 8, 3), n, 160.0)
    deliver(411, 41, at(-1, 23, 58), 1, 100.0)
    add_mosaiq(site, database)

    assert run(incremental_backup, site, at(0, 0, 1), source="mosaiq").is_completed()
    deliver(412, 41, at(0, 0, 3), 1, 110.0)  # the same fraction, after midnight
    assert run(incremental_backup, site, at(0, 0, 11), source="mosaiq").is_completed()
    deliver(401, 40, at(0, 8, 0), 5, 150.0)
    assert run(incremental_backup, site, at(0, 8, 2), source="mosaiq").is_completed()
    deliver(402, 40, at(0, 8, 4), 5, 160.0)  # the second arc, after the run
    last = run(incremental_backup, site, at(0, 8, 12), source="mosaiq")
    assert last.is_completed(), last.message
    assert any("made again as new records" in n for n in last.result()["peer_notes"]), \
        last.result()["peer_notes"]

    records = backup_records(site)
    beams: dict[tuple[str, int], list[set[str]]] = {}
    for ds in records:
        fraction = int(ds.TreatmentSessionBeamSequence[0].CurrentFractionNumber)
        beams.setdefault((str(ds.SeriesDescription), fraction), []).append(
            {str(b.BeamName) for b in ds.TreatmentSessionBeamSequence})
    assert max(beams[("Prostate", 5)], key=len) == {"Arc A", "Arc B"}, beams
    assert max(beams[("Nodes", 1)], key=len) == {"Nodes AP", "Nodes PA"}, beams
    assert len(beams[("Prostate", 5)]) == 2 and len(beams[("Nodes", 1)]) == 2  # both kept
    ledger = Ledger.for_state_dir(site.workdir / "state").at(Lane("DEMO", "mosaiq", "orthanc"))
    assert len(ledger.superseded()) == 2
    assert not dciodvfy_problems(records, tmp_path)

    out = tmp_path / "report.csv"
    state = treatment_report(site="DEMO", config=str(site.config_path), end_date=DAY.date(),
                             out=str(out), return_state=True)
    assert state.is_completed(), state.message
    report = pd.read_csv(out, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    rows = {r.RTPlanLabel: r for r in report.itertuples() if r.PatientID == "MQ0004"}
    assert set(rows) == {"Prostate", "Nodes"}, report
    assert (rows["Prostate"].CurrentFraction, rows["Prostate"].FractionsPlanned,
            rows["Prostate"].FractionsRemaining) == ("5", "39", "34")
    assert float(rows["Prostate"].LastMeterset) == 310.0  # both arcs of fraction 5
    assert (rows["Nodes"].CurrentFraction, rows["Nodes"].FractionsPlanned) == ("1", "25")
    assert float(rows["Nodes"].LastMeterset) == 210.0
    assert rows["Prostate"].FirstTreatment.startswith(f"{at(-4, 0):%Y-%m-%d}")
    # Nothing but what Mosaiq's SQL does not say (the query contract has no machine column).
    assert {r.Warnings for r in rows.values()} == {"no treatment machine"}, rows

    from flows.downtime_pack import downtime_pack
    from tests.test_recovery import text_of

    packs = tmp_path / "packs"
    assert run(downtime_pack, site, at(0, 9), days=7, folder=str(packs)).is_completed()
    sheet = text_of((packs / "current" / "MQ0004" / "sheet.html").read_text(encoding="utf-8"))
    for said in ("Prescription Prostate", "Next fraction 6 of 39", "Prescription Nodes",
                 "Next fraction 2 of 25", "Arc A PHOTON 150 NORMAL", "Arc B PHOTON 160 NORMAL",
                 "Nodes AP PHOTON 100 NORMAL", "Nodes PA PHOTON 110 NORMAL",
                 f"First treatment of the course {at(-4, 8):%Y-%m-%d %H:%M}"):
        assert said in sheet, (said, sheet)

    summary_csv = tmp_path / "summary.csv"
    assert mosaiq_summary(site="DEMO", source="mosaiq", config=str(site.config_path),
                          out=str(summary_csv), mrn="MQ0004", return_state=True).is_completed()
    summary = pd.read_csv(summary_csv, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    for course in summary.itertuples():  # the report and Mosaiq's own account agree
        row = rows[course.Site]
        assert (row.CurrentFraction, row.FractionsPlanned) == (
            course.FractionsDelivered, course.FractionsPlanned), (course, row)


def test_odd_mosaiq_rows_make_valid_records_and_are_named(
        make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    """A patient without an Ident row, a 70-character MRN with a 90-character name and a ``^``
    in the first name, a NULL fraction number, fraction 0, -5 MU and 1e9 MU: every record
    passes dciodvfy without an error (and without the study and series warnings), each odd
    value is named in the run summary by patient ID, and the report's Warnings say it."""
    import pandas as pd

    from flows.treatment_report import treatment_report

    site = make_site()
    database = tmp_path / "mosaiq.db"
    db = sqlite3.connect(database)
    db.executescript(SCHEMA)
    long_mrn, long_name = "M" * 70, "L" * 90
    db.executemany("INSERT INTO Patient VALUES (?, ?, ?)", [
        (5, "Noident", "Pat"), (6, long_name, "Jo^hn"), (7, "Odd", "Values")])
    db.executemany("INSERT INTO Ident VALUES (?, ?)", [(6, long_mrn), (7, "MQ0007")])
    db.executemany("INSERT INTO Site VALUES (?, ?, ?, ?, ?, ?, ?)", [
        (50, 50, 5, "Brain", 5400.0, 30, 0), (60, 60, 6, "Lung", 6000.0, None, 0),
        (70, 70, 7, "Pelvis", 4500.0, 25, 0)])
    db.executemany("INSERT INTO TxField VALUES (?, ?, ?, ?, ?)", [
        (501, 50, "Brain 1", "X", 0), (601, 60, "Lung 1", "X", 0), (701, 70, "P1", "X", 0),
        (702, 70, "P2", "X", 0)])
    db.executemany("INSERT INTO Dose_Hst (Pat_ID1, FLD_ID, SIT_ID, Tx_DtTm, Fractions_Tx, "
                   "Meterset) VALUES (?, ?, ?, ?, ?, ?)", [
                       (5, 501, 50, ts(at(0, 9)), 3, 200.0),
                       (6, 601, 60, ts(at(0, 10)), None, 250.0),
                       (7, 701, 70, ts(at(0, 11)), 0, -5.0),
                       (7, 702, 70, ts(at(0, 11, 5)), 0, 1e9)])
    db.commit()
    add_mosaiq(site, database)

    state = run(incremental_backup, site, at(0, 16), source="mosaiq")
    assert state.is_completed(), state.message
    records = backup_records(site)
    assert len(records) == 3
    assert not dciodvfy_problems(records, tmp_path)
    by_patient = {str(ds.PatientID): ds for ds in records}
    assert set(by_patient) == {"5", long_mrn[:64], "MQ0007"}  # no Ident row: Pat_ID1
    named = " ".join(state.result()["peer_notes"])
    for said in ("Pat_ID1 5), prescription 50: no Ident row", "MRN of 70 characters cut to 64",
                 "delimiters replaced", "without a fraction number", "as fraction 0",
                 "negative meterset (-5.0 MU)", "1e+09 MU (over 2000)"):
        assert said in named, (said, named)
    assert long_name[:10] not in named and "Noident" not in named  # IDs, never names

    out = tmp_path / "report.csv"
    treatment_report(site="DEMO", config=str(site.config_path), end_date=DAY.date(),
                     out=str(out), return_state=True)
    report = pd.read_csv(out, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    odd = report[report.PatientID == "MQ0007"].iloc[0]
    assert "fraction number 0" in odd.Warnings and "negative delivered meterset" in odd.Warnings \
        and "over 2000" in odd.Warnings, odd.Warnings
