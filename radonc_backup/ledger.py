"""The ledger: what has been found on each source and what is verified in each backup.

One SQLite file under the site's state directory. A row moves found -> moved -> verified, or to
failed (and back to moved on a retry). ``verified`` is set only by ``mark_verified``, which callers
use only after a presence check in the backup, and a verified row is never downgraded by a later
failure. Every write is one ``BEGIN IMMEDIATE`` transaction, with WAL and a busy timeout, so two
processes (a 10-minute run and a nightly run) can share the file. Each thread keeps its own
connection to the file for the life of the ``Ledger`` object.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import ConfigError
from .instance import InstanceRef

STATES = ("found", "moved", "verified", "failed")
_CHUNK = 500
_INHERITED: list[sqlite3.Connection] = []  # connections a forked child must leave alone

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    site TEXT NOT NULL,
    source TEXT NOT NULL,
    backup TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL DEFAULT '',
    patient_id TEXT NOT NULL DEFAULT '',
    study_uid TEXT NOT NULL DEFAULT '',
    series_uid TEXT NOT NULL DEFAULT '',
    treatment_date TEXT NOT NULL DEFAULT '',
    treatment_time TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL CHECK (state IN ('found', 'moved', 'verified', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    first_seen TEXT NOT NULL,
    updated TEXT NOT NULL,
    verified_at TEXT,
    kind TEXT NOT NULL DEFAULT 'record',
    PRIMARY KEY (site, source, backup, sop_instance_uid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS instances_state ON instances (site, source, backup, state);
CREATE TABLE IF NOT EXISTS watermarks (
    site TEXT NOT NULL,
    source TEXT NOT NULL,
    backup TEXT NOT NULL,
    watermark_utc TEXT NOT NULL,
    updated TEXT NOT NULL,
    PRIMARY KEY (site, source, backup)
);
CREATE TABLE IF NOT EXISTS record_plans (
    site TEXT NOT NULL,
    source TEXT NOT NULL,
    backup TEXT NOT NULL,
    record_uid TEXT NOT NULL,
    plan_uid TEXT NOT NULL,
    patient_id TEXT NOT NULL DEFAULT '',
    machine TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (site, source, backup, record_uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS plan_contexts (
    site TEXT NOT NULL,
    source TEXT NOT NULL,
    backup TEXT NOT NULL,
    plan_uid TEXT NOT NULL,
    patient_id TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL CHECK (state IN ('complete', 'incomplete', 'deferred', 'skipped')),
    detail TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    updated TEXT NOT NULL,
    PRIMARY KEY (site, source, backup, plan_uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS peer_caps (
    peer TEXT PRIMARY KEY,
    cap INTEGER NOT NULL,
    seen TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS peer_answers (
    peer TEXT NOT NULL,
    level TEXT NOT NULL,
    largest INTEGER NOT NULL,
    seen TEXT NOT NULL,
    PRIMARY KEY (peer, level)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fraction_acks (
    site TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    plan_uid TEXT NOT NULL,
    fraction INTEGER NOT NULL,
    note TEXT NOT NULL,
    acknowledged_by TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (site, patient_id, plan_uid, fraction)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fixity (
    site TEXT NOT NULL,
    backup TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    md5 TEXT NOT NULL,
    size INTEGER NOT NULL,
    recorded TEXT NOT NULL,
    checked TEXT NOT NULL,
    problem TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (site, backup, sop_instance_uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state_history (
    site TEXT NOT NULL,
    source TEXT NOT NULL,
    backup TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    at TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS state_history_uid ON state_history (site, source, backup,
                                                               sop_instance_uid);
CREATE TRIGGER IF NOT EXISTS instances_first_state AFTER INSERT ON instances BEGIN
    INSERT INTO state_history VALUES (NEW.site, NEW.source, NEW.backup, NEW.sop_instance_uid,
                                      NEW.state, NEW.updated, NEW.last_error);
END;
CREATE TRIGGER IF NOT EXISTS instances_state_change AFTER UPDATE OF state ON instances
WHEN NEW.state != OLD.state BEGIN
    INSERT INTO state_history VALUES (NEW.site, NEW.source, NEW.backup, NEW.sop_instance_uid,
                                      NEW.state, NEW.updated, NEW.last_error);
END;
CREATE TABLE IF NOT EXISTS session_records (
    site TEXT NOT NULL,
    source TEXT NOT NULL,
    backup TEXT NOT NULL,
    session TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    fields INTEGER NOT NULL,
    made TEXT NOT NULL,
    superseded_by TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (site, source, backup, sop_instance_uid)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class Lane:
    """One path data takes: from a site's source to one of its backup targets."""

    site: str
    source: str
    backup: str


@dataclass(frozen=True)
class LedgerRow:
    ref: InstanceRef
    state: str
    attempts: int
    last_error: str
    updated: str


def _now() -> str:
    return _iso(datetime.now(timezone.utc))


def _iso(instant: datetime) -> str:
    """UTC, to the second: the form the ledger's timestamps compare in."""
    return instant.astimezone(timezone.utc).isoformat(timespec="seconds")


def _chunks(items: list[str], size: int = _CHUNK) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@dataclass(frozen=True)
class PlanLink:
    """An RT Record's plan, as read from the record's copy in the backup."""

    plan_uid: str
    patient_id: str
    machine: str


class LedgerError(ConfigError):
    """The ledger file cannot be used (damaged, read-only, not a ledger)."""


class Ledger:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as conn:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
                columns = {row[1] for row in conn.execute("PRAGMA table_info(instances)")}
                if "kind" not in columns:  # ledgers written before plan-context backfill
                    conn.execute("ALTER TABLE instances ADD COLUMN kind TEXT NOT NULL "
                                 "DEFAULT 'record'")
        except (sqlite3.DatabaseError, OSError) as exc:
            raise LedgerError(
                f"ledger {self.path}: cannot be opened or written ({exc}). If it is damaged, "
                f"move it aside (mv {self.path} {self.path}.damaged) and run the nightly backup "
                "with --days covering the time since its last good run: the backup is asked "
                "first, so nothing already there moves again") from None

    @classmethod
    def for_state_dir(cls, state_dir: Path) -> "Ledger":
        return cls(state_dir / "ledger.sqlite")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, opened on first use and kept: opening one, and closing
        the last one (a WAL checkpoint), cost milliseconds each, per ledger call. Any error
        inside drops it (closing rolls back what was left open), so the next call starts from a
        fresh connection as before. A connection never crosses a fork."""
        held: tuple[int, sqlite3.Connection] | None = getattr(self._local, "conn", None)
        if held is not None and held[0] != os.getpid():
            _INHERITED.append(held[1])  # the parent's: never used, and never closed, here
            held = None
        if held is None:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            try:
                conn.execute("PRAGMA busy_timeout=60000")
                conn.execute("PRAGMA synchronous=NORMAL")
            except BaseException:
                conn.close()
                raise
            held = self._local.conn = (os.getpid(), conn)
        try:
            yield held[1]
        except BaseException:
            self._local.conn = None
            held[1].close()
            raise

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def copy_to(self, folder: Path, day: str, keep: int) -> Path:
        """A consistent copy of the whole ledger (SQLite's online backup, safe while other runs
        write) as ``folder/ledger-<day>.sqlite``; only the newest ``keep`` copies are kept."""
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"ledger-{day}.sqlite"
        partial = target.with_suffix(".partial")
        src = sqlite3.connect(self.path, timeout=60)
        dst = sqlite3.connect(partial)
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()
        partial.replace(target)
        for old in sorted(folder.glob("ledger-*.sqlite"))[:-keep or None]:
            old.unlink()
        return target

    def lanes(self) -> list[Lane]:
        """Every lane this ledger holds rows for."""
        with self._connect() as conn:
            return [Lane(*row) for row in conn.execute(
                "SELECT DISTINCT site, source, backup FROM instances ORDER BY 1, 2, 3")]

    def peer_cap(self, peer: str) -> int:
        """The C-FIND answer cap ``peer`` (AE@host:port) has shown before; 0: none seen."""
        with self._connect() as conn:
            row = conn.execute("SELECT cap FROM peer_caps WHERE peer=?", (peer,)).fetchone()
        return int(row[0]) if row else 0

    def remember_cap(self, peer: str, cap: int) -> None:
        """Keep the smallest cap ``peer`` has shown: later answers that reach it are split."""
        with self._write() as conn:
            conn.execute("INSERT INTO peer_caps (peer, cap, seen) VALUES (?, ?, ?) ON CONFLICT "
                         "(peer) DO UPDATE SET cap=MIN(cap, excluded.cap), seen=excluded.seen",
                         (peer, cap, _now()))

    def largest_answers(self, peer: str) -> dict[str, int]:
        """The largest C-FIND answer ``peer`` has returned at each query level."""
        with self._connect() as conn:
            return {level: int(n) for level, n in conn.execute(
                "SELECT level, largest FROM peer_answers WHERE peer=?", (peer,))}

    def remember_answers(self, peer: str, largest: dict[str, int]) -> None:
        """Keep, per level, the largest answer ``peer`` has returned (an answer reaching it
        may be cut by a cap the peer never announced, and is checked)."""
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO peer_answers (peer, level, largest, seen) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (peer, level) DO UPDATE SET largest=MAX(largest, "
                "excluded.largest), seen=excluded.seen",
                [(peer, level, n, _now()) for level, n in largest.items()])

    def acknowledge_fractions(self, site: str, patient_id: str, plan_uid: str,
                              fractions: Iterable[int], note: str, by: str) -> int:
        """Keep an operator's word that these fractions of a plan will never be in the backup
        (delivered elsewhere, a plan that goes on counting): fraction continuity stops naming
        them. Returns how many were newly acknowledged; an acknowledgement is never rewritten."""
        rows = [(site, patient_id, plan_uid, int(n), note, by, _now()) for n in fractions]
        with self._write() as conn:
            before = conn.total_changes
            conn.executemany("INSERT OR IGNORE INTO fraction_acks VALUES (?, ?, ?, ?, ?, ?, ?)",
                             rows)
            return conn.total_changes - before

    def acknowledged_fractions(self, site: str) -> dict[tuple[str, str], set[int]]:
        """(patient, plan) -> the fractions acknowledged as never to be in the backup."""
        out: dict[tuple[str, str], set[int]] = {}
        with self._connect() as conn:
            for patient, plan, n in conn.execute(
                    "SELECT patient_id, plan_uid, fraction FROM fraction_acks WHERE site=?",
                    (site,)):
                out.setdefault((patient, plan), set()).add(int(n))
        return out

    def patients_verified_since(self, site: str, since_utc: str) -> set[str]:
        """PatientIDs of the site's instances (RT Records and plan context) verified in the
        backup at or after this instant (ISO, UTC), whatever the source: the patients a
        downtime pack built before it lacks."""
        with self._connect() as conn:
            return {row[0] for row in conn.execute(
                "SELECT DISTINCT patient_id FROM instances WHERE site=? AND state='verified' "
                "AND verified_at >= ?", (site, since_utc))}

    def verified_everywhere(self, site: str, backup: str) -> list[InstanceRef]:
        """Every instance of the site verified in ``backup``, RT Records and plan context, of
        every source (one row per UID)."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT sop_instance_uid, MIN(sop_class_uid), MIN(patient_id), MIN(study_uid), "
                "MIN(series_uid), MIN(treatment_date), MIN(treatment_time) FROM instances "
                "WHERE site=? AND backup=? AND state='verified' GROUP BY sop_instance_uid "
                "ORDER BY sop_instance_uid", (site, backup)).fetchall()
        return [InstanceRef(*r) for r in rows]

    def fixity(self, site: str, backup: str) -> dict[str, tuple[str, int, str]]:
        """UID -> (MD5, size, when last checked) of each file whose digest the ledger keeps."""
        with self._connect() as conn:
            return {uid: (md5, size, checked) for uid, md5, size, checked in conn.execute(
                "SELECT sop_instance_uid, md5, size, checked FROM fixity WHERE site=? AND "
                "backup=?", (site, backup))}

    def record_fixity(self, site: str, backup: str,
                      rows: Iterable[tuple[str, str, int, str]]) -> None:
        """(UID, MD5, size, problem) as checked now. A digest is recorded the first time and
        never rewritten: a later check that differs is a problem, kept with it."""
        now = _now()
        with self._write() as conn:
            for uid, md5, size, problem in rows:
                conn.execute(
                    "INSERT INTO fixity VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (site, "
                    "backup, sop_instance_uid) DO UPDATE SET checked=excluded.checked, "
                    "problem=excluded.problem", (site, backup, uid, md5, size, now, now, problem))

    def at(self, lane: Lane) -> "LaneLedger":
        """This ledger as one lane sees it."""
        return LaneLedger(self, lane)


class LaneLedger:
    """The ledger bound to one lane: every read and write is of that lane's rows."""

    def __init__(self, ledger: Ledger, lane: Lane) -> None:
        self.ledger, self.lane = ledger, lane
        self.key = (lane.site, lane.source, lane.backup)
        self.path = ledger.path
        self._connect, self._write = ledger._connect, ledger._write

    def record_sessions(self, made: Iterable[tuple[str, str, int]]) -> list[tuple[str, str]]:
        """Remember the records made of each session (session, SOP Instance UID, fields) and
        mark the earlier ones superseded by the record with the most fields (then the newest).
        Returns the (superseded, by) pairs newly marked; nothing is ever deleted."""
        rows = [(*self.key, session, uid, fields, _now()) for session, uid, fields in made]
        marked = []
        with self._write() as conn:
            conn.executemany("INSERT OR IGNORE INTO session_records (site, source, backup, "
                             "session, sop_instance_uid, fields, made) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             rows)
            for session in sorted({r[3] for r in rows}):
                kept = conn.execute(
                    "SELECT sop_instance_uid FROM session_records WHERE site=? AND source=? "
                    "AND backup=? AND session=? ORDER BY fields DESC, made DESC, "
                    "sop_instance_uid LIMIT 1", (*self.key, session)).fetchone()[0]
                for (uid,) in conn.execute(
                        "SELECT sop_instance_uid FROM session_records WHERE site=? AND source=? "
                        "AND backup=? AND session=? AND sop_instance_uid<>? AND superseded_by<>?",
                        (*self.key, session, kept, kept)).fetchall():
                    marked.append((uid, kept))
                conn.execute("UPDATE session_records SET superseded_by=? WHERE site=? AND "
                             "source=? AND backup=? AND session=? AND sop_instance_uid<>?",
                             (kept, *self.key, session, kept))
                conn.execute("UPDATE session_records SET superseded_by='' WHERE site=? AND "
                             "source=? AND backup=? AND sop_instance_uid=?", (*self.key, kept))
        return marked

    def superseded(self) -> dict[str, str]:
        """Record UID -> the UID of the record of the same session that supersedes it."""
        with self._connect() as conn:
            return dict(conn.execute(
                "SELECT sop_instance_uid, superseded_by FROM session_records WHERE site=? AND "
                "source=? AND backup=? AND superseded_by<>''", self.key).fetchall())

    def record_found(self, refs: Iterable[InstanceRef], kind: str = "record") -> int:
        """Add instances seen on the source; returns how many were new to the ledger.

        ``kind`` is 'record' for RT Records and 'context' for plan-context objects; the record
        flows only ever retry records.
        """
        now = _now()
        rows = [(*self.key, r.sop_instance_uid, r.sop_class_uid,
                 r.patient_id, r.study_uid, r.series_uid, r.treatment_date, r.treatment_time,
                 now, now, kind) for r in refs]
        with self._write() as conn:
            # rowcount, not total_changes: the history trigger's rows are not new instances.
            return conn.executemany(
                "INSERT OR IGNORE INTO instances (site, source, backup, sop_instance_uid, "
                "sop_class_uid, patient_id, study_uid, series_uid, treatment_date, "
                "treatment_time, state, first_seen, updated, kind) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'found', ?, ?, ?)", rows).rowcount

    def has_records(self) -> bool:
        """Whether this ledger knows any RT Record of the lane (False: new, or replaced)."""
        with self._connect() as conn:
            return conn.execute("SELECT 1 FROM instances WHERE site=? AND source=? AND "
                                "backup=? AND kind='record' LIMIT 1",
                                self.key).fetchone() is not None

    def patients_with_records_since(self, day: str) -> list[str]:
        """Patient IDs with an RT Record of this lane treated on or after ``day`` (YYYYMMDD),
        or with one whose treatment date is unknown."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT DISTINCT patient_id FROM instances WHERE site=? AND source=? AND "
                "backup=? AND kind='record' AND patient_id != '' AND "
                "(treatment_date >= ? OR treatment_date = '')",
                (*self.key, day)).fetchall()
        return sorted(r[0] for r in rows)

    def studies_with_records_since(self, day: str) -> list[tuple[str, str]]:
        """(Patient ID, Study UID) of each study holding an RT Record of this lane treated on or
        after ``day`` (YYYYMMDD), or one whose treatment date is unknown."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT DISTINCT patient_id, study_uid FROM instances WHERE site=? AND "
                "source=? AND backup=? AND kind='record' AND study_uid != '' AND "
                "(treatment_date >= ? OR treatment_date = '')",
                (*self.key, day)).fetchall()
        return sorted((r[0], r[1]) for r in rows)

    def states(self, uids: Iterable[str]) -> dict[str, str]:
        """State of each UID the ledger knows (unknown UIDs are absent)."""
        wanted = list(dict.fromkeys(uids))
        out: dict[str, str] = {}
        with self._connect() as conn:
            for chunk in _chunks(wanted):
                marks = ",".join("?" * len(chunk))
                for uid, state in conn.execute(
                        f"SELECT sop_instance_uid, state FROM instances WHERE site=? AND source=? "
                        f"AND backup=? AND sop_instance_uid IN ({marks})",
                        (*self.key, *chunk)):
                    out[uid] = state
        return out

    def known(self, uids: Iterable[str]) -> dict[str, tuple[InstanceRef, str]]:
        """UID -> (its row's InstanceRef, the day it was last verified or updated, YYYYMMDD)."""
        wanted = list(dict.fromkeys(uids))
        out: dict[str, tuple[InstanceRef, str]] = {}
        with self._connect() as conn:
            for chunk in _chunks(wanted):
                marks = ",".join("?" * len(chunk))
                for r in conn.execute(
                        f"SELECT sop_instance_uid, sop_class_uid, patient_id, study_uid, "
                        f"series_uid, treatment_date, treatment_time, "
                        f"COALESCE(verified_at, updated) FROM instances WHERE site=? AND "
                        f"source=? AND backup=? AND sop_instance_uid IN ({marks})",
                        (*self.key, *chunk)):
                    out[r[0]] = (InstanceRef(*r[:7]), str(r[7])[:10].replace("-", ""))
        return out

    def history(self, uid: str) -> list[tuple[str, str, str]]:
        """Every state the row of ``uid`` has been in: (state, when, last error then)."""
        with self._connect() as conn:
            return [tuple(r) for r in conn.execute(  # type: ignore[misc]
                "SELECT state, at, detail FROM state_history WHERE site=? AND source=? AND "
                "backup=? AND sop_instance_uid=? ORDER BY at, rowid", (*self.key, uid))]

    def patients_of(self, uids: Iterable[str]) -> set[str]:
        """The PatientIDs of these UIDs, as the ledger knows them."""
        wanted = list(dict.fromkeys(uids))
        out: set[str] = set()
        with self._connect() as conn:
            for chunk in _chunks(wanted):
                marks = ",".join("?" * len(chunk))
                out |= {row[0] for row in conn.execute(
                    f"SELECT DISTINCT patient_id FROM instances WHERE site=? AND source=? AND "
                    f"backup=? AND sop_instance_uid IN ({marks})", (*self.key, *chunk))}
        return out

    def unverified(self, kind: str = "record") -> list[InstanceRef]:
        """Every row of ``kind`` still to be backed up (found, moved or failed), oldest first."""
        sql = ("SELECT sop_instance_uid, sop_class_uid, patient_id, study_uid, series_uid, "
               "treatment_date, treatment_time FROM instances WHERE site=? AND source=? AND "
               "backup=? AND state IN ('found', 'moved', 'failed') AND kind=? "
               "ORDER BY first_seen, sop_instance_uid")
        with self._connect() as conn:
            return [InstanceRef(*row) for row in
                    conn.execute(sql, (*self.key, kind))]

    def mark_moved(self, uids: Iterable[str]) -> None:
        """A move was requested: count the attempt. Not proof of anything."""
        self._update(list(uids),
                     "state='moved', attempts=attempts+1, updated=?", (_now(),))

    def mark_verified(self, uids: Iterable[str]) -> None:
        """Only after the instance was seen in the backup."""
        now = _now()
        self._update(list(uids),
                     "state='verified', last_error='', updated=?, verified_at=?", (now, now))

    def mark_failed(self, errors: dict[str, str]) -> None:
        now = _now()
        with self._write() as conn:
            conn.executemany(
                "UPDATE instances SET state='failed', last_error=?, updated=? WHERE site=? AND "
                "source=? AND backup=? AND sop_instance_uid=? AND state != 'verified'",
                [(err[:2000], now, *self.key, uid)
                 for uid, err in errors.items()])

    def reopen_missing(self, errors: dict[str, str]) -> None:
        """Verified rows the backup no longer holds go back to failed: the next runs move them
        again. The only way a row leaves 'verified', and only on a presence check's word."""
        now = _now()
        with self._write() as conn:
            conn.executemany(
                "UPDATE instances SET state='failed', last_error=?, updated=?, verified_at=NULL "
                "WHERE site=? AND source=? AND backup=? AND sop_instance_uid=? AND "
                "state='verified'",
                [(err[:2000], now, *self.key, uid)
                 for uid, err in errors.items()])

    def reopen_contexts(self, patient_ids: Iterable[str], detail: str) -> int:
        """Mark the complete plan contexts of these patients incomplete, to be walked again."""
        ids = sorted(set(patient_ids))
        changed = 0
        with self._write() as conn:
            for chunk in _chunks(ids):
                changed += conn.execute(
                    f"UPDATE plan_contexts SET state='incomplete', detail=?, updated=? WHERE "
                    f"site=? AND source=? AND backup=? AND state='complete' AND patient_id IN "
                    f"({','.join('?' * len(chunk))})",
                    (detail[:4000], _now(), *self.key, *chunk)).rowcount
        return changed

    def _update(self, uids: list[str], assignments: str,
                params: tuple[object, ...]) -> None:
        with self._write() as conn:
            for chunk in _chunks(uids):
                marks = ",".join("?" * len(chunk))
                conn.execute(
                    f"UPDATE instances SET {assignments} WHERE site=? AND source=? AND backup=? "
                    f"AND state != 'verified' AND sop_instance_uid IN ({marks})",
                    (*params, *self.key, *chunk))

    def rows(self, *states: str, kind: str = "record", day: str | None = None,
             ) -> list[LedgerRow]:
        """Rows of the lane, only those in ``states`` if any are given (uses the state index),
        and of one TreatmentDate if ``day`` is given."""
        sql = ("SELECT sop_instance_uid, sop_class_uid, patient_id, study_uid, series_uid, "
               "treatment_date, treatment_time, state, attempts, last_error, updated "
               "FROM instances WHERE site=? AND source=? AND backup=? AND kind=?")
        params: tuple[object, ...] = (*self.key, kind)
        if day is not None:
            sql += " AND treatment_date=?"
            params += (day,)
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            params += states
        with self._connect() as conn:
            return [LedgerRow(InstanceRef(*r[:7]), r[7], r[8], r[9], r[10])
                    for r in conn.execute(sql + " ORDER BY sop_instance_uid", params)]

    def counts(self, kind: str = "record") -> dict[str, int]:
        with self._connect() as conn:
            found = dict(conn.execute(
                "SELECT state, COUNT(*) FROM instances WHERE site=? AND source=? AND backup=? "
                "AND kind=? GROUP BY state", (*self.key, kind))
                .fetchall())
        return {s: int(found.get(s, 0)) for s in STATES}

    def watermark(self) -> datetime | None:
        with self._connect() as conn:
            row = conn.execute("SELECT watermark_utc FROM watermarks WHERE site=? AND source=? "
                               "AND backup=?", self.key).fetchone()
        return datetime.fromisoformat(row[0]) if row else None

    def advance_watermark(self, to: datetime) -> datetime:
        """Move the watermark forward to ``to`` (never back); returns the stored value."""
        if to.tzinfo is None:
            raise ValueError("watermark must be timezone-aware")
        value = to.astimezone(timezone.utc).isoformat()
        with self._write() as conn:
            row = conn.execute("SELECT watermark_utc FROM watermarks WHERE site=? AND source=? "
                               "AND backup=?", self.key).fetchone()
            if row and datetime.fromisoformat(row[0]) >= to:
                return datetime.fromisoformat(row[0])
            conn.execute(
                "INSERT INTO watermarks (site, source, backup, watermark_utc, updated) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (site, source, backup) DO UPDATE SET "
                "watermark_utc=excluded.watermark_utc, updated=excluded.updated",
                (*self.key, value, _now()))
        return to.astimezone(timezone.utc)

    def verified_by_class(self, kind: str = "context") -> dict[str, int]:
        """Cumulative verified instances of ``kind`` per SOP Class UID."""
        with self._connect() as conn:
            return dict(conn.execute(
                "SELECT sop_class_uid, COUNT(*) FROM instances WHERE site=? AND source=? AND "
                "backup=? AND kind=? AND state='verified' GROUP BY sop_class_uid",
                (*self.key, kind)).fetchall())

    _UNLINKED = ("FROM instances i LEFT JOIN record_plans p ON p.site=i.site AND "
                 "p.source=i.source AND p.backup=i.backup AND p.record_uid=i.sop_instance_uid "
                 "WHERE i.site=? AND i.source=? AND i.backup=? AND i.kind='record' AND "
                 "i.state='verified' AND p.record_uid IS NULL")

    def verified_records_without_plan(self, limit: int | None = None) -> list[InstanceRef]:
        """Verified RT Records whose plan has not been read yet; with ``limit``, that many at
        random, so that records whose copy cannot be read never keep the rest waiting."""
        sql = ("SELECT i.sop_instance_uid, i.sop_class_uid, i.patient_id, i.study_uid, "
               "i.series_uid, i.treatment_date, i.treatment_time " + self._UNLINKED)
        if limit is not None:
            sql += f" ORDER BY RANDOM() LIMIT {int(limit)}"
        with self._connect() as conn:
            return [InstanceRef(*r) for r in conn.execute(sql, self.key)]

    def count_records_without_plan(self) -> int:
        with self._connect() as conn:
            return int(conn.execute("SELECT COUNT(*) " + self._UNLINKED, self.key).fetchone()[0])

    def linked(self, record_uids: Iterable[str]) -> set[str]:
        """Those of ``record_uids`` whose plan reference was read already."""
        wanted = set(record_uids)
        with self._connect() as conn:
            known = {r[0] for r in conn.execute(
                "SELECT record_uid FROM record_plans WHERE site=? AND source=? AND backup=?",
                self.key)}
        return wanted & known

    def link_plans(self, links: dict[str, PlanLink]) -> None:
        with self._write() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO record_plans (site, source, backup, record_uid, plan_uid, "
                "patient_id, machine) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(*self.key, uid, link.plan_uid, link.patient_id,
                  link.machine) for uid, link in links.items()])

    def plans(self, record_uids: Iterable[str] | None = None,
              pending_only: bool = True, unwalked_too: bool = False,
              retry_before: datetime | None = None) -> list[PlanLink]:
        """Plans referenced by backed-up records (of ``record_uids`` if given), one per plan.

        ``pending_only``: leave out plans whose context is complete or skipped (incomplete and
        deferred ones are pending). ``unwalked_too``: with ``record_uids``, also every plan whose
        context was never walked at all (a run killed between verifying and walking), and, with
        ``retry_before``, every incomplete one last walked before then.
        """
        retry = _iso(retry_before) if retry_before else ""
        sql = ("SELECT p.plan_uid, MIN(p.patient_id), MIN(p.machine), "
               "GROUP_CONCAT(p.record_uid, '\\'), MAX(c.state IS NULL OR (c.state = "
               "'incomplete' AND c.updated < ?)) FROM record_plans p "
               "LEFT JOIN plan_contexts c ON c.site=p.site AND c.source=p.source AND "
               "c.backup=p.backup AND c.plan_uid=p.plan_uid "
               "WHERE p.site=? AND p.source=? AND p.backup=?")
        sql += " AND p.plan_uid != ''"
        if pending_only:
            sql += " AND (c.state IS NULL OR c.state IN ('incomplete', 'deferred'))"
        sql += " GROUP BY p.plan_uid ORDER BY MIN(p.patient_id), p.plan_uid"
        wanted = set(record_uids) if record_uids is not None else None
        with self._connect() as conn:
            rows = conn.execute(sql, (retry, *self.key)).fetchall()
        return [PlanLink(plan, pid, machine) for plan, pid, machine, records, unwalked in rows
                if wanted is None or wanted & set(records.split("\\"))
                or (unwalked_too and unwalked)]

    def context_work_left(self, retry_before: datetime | None = None) -> bool:
        """Whether a verified record was never linked to its plan, or a linked plan's context
        never walked (what a killed run leaves behind), or (``retry_before``) an incomplete
        context was last walked before then."""
        with self._connect() as conn:
            unlinked = conn.execute(
                "SELECT 1 FROM instances i WHERE i.site=? AND i.source=? AND i.backup=? AND "
                "i.kind='record' AND i.state='verified' AND NOT EXISTS (SELECT 1 FROM "
                "record_plans p WHERE p.site=i.site AND p.source=i.source AND "
                "p.backup=i.backup AND p.record_uid=i.sop_instance_uid) LIMIT 1",
                self.key).fetchone()
            unwalked = conn.execute(
                "SELECT 1 FROM record_plans p WHERE p.site=? AND p.source=? AND p.backup=? "
                "AND p.plan_uid != '' AND NOT EXISTS (SELECT 1 FROM plan_contexts c WHERE "
                "c.site=p.site AND c.source=p.source AND c.backup=p.backup AND "
                "c.plan_uid=p.plan_uid) LIMIT 1",
                self.key).fetchone()
            stale = retry_before is not None and conn.execute(
                "SELECT 1 FROM plan_contexts WHERE site=? AND source=? AND backup=? AND "
                "state='incomplete' AND updated < ? LIMIT 1",
                (*self.key, _iso(retry_before))).fetchone()
        return bool(unlinked or unwalked or stale)

    def records_without_plan(self) -> list[str]:
        """Backed-up records whose ReferencedRTPlanSequence is empty (Type 2: allowed)."""
        with self._connect() as conn:
            return [r[0] for r in conn.execute(
                "SELECT record_uid FROM record_plans WHERE site=? AND source=? AND backup=? AND "
                "plan_uid='' ORDER BY record_uid", self.key)]

    def set_context(self, plan_uid: str, patient_id: str, state: str,
                    detail: str = "") -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO plan_contexts (site, source, backup, plan_uid, patient_id, state, "
                "detail, attempts, updated) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?) "
                "ON CONFLICT (site, source, backup, plan_uid) DO UPDATE SET state=excluded.state, "
                "detail=excluded.detail, attempts=attempts+1, updated=excluded.updated",
                (*self.key, plan_uid, patient_id, state, detail[:4000],
                 _now()))

    def contexts(self) -> dict[str, tuple[str, str]]:
        """Plan UID -> (state, detail) for every plan whose context has been walked."""
        with self._connect() as conn:
            return {plan: (state, detail) for plan, state, detail in conn.execute(
                "SELECT plan_uid, state, detail FROM plan_contexts WHERE site=? AND source=? AND "
                "backup=?", self.key)}
