"""Which RT Records the backup holds, without listing every one of them at every report.

A full listing (``/tools/find`` at instance level, Modality RTRECORD) costs about 40 us a record
in Orthanc 1.10 (8.2 s at 200,000 records, measured by bench/bench_report.py). The report runs
every day, and an outage day is when it must be quick. So after one full listing the cache keeps
a cursor into Orthanc's change log, and later runs read only what arrived since:

- new records: every instance stored after the cursor has a ``NewInstance`` entry with a higher
  sequence number, so none is missed; each is looked up once and kept if its series is an
  RT Record series;
- deleted records: Orthanc removes a deleted resource's entries from its log, so a deletion does
  not show there. The cursor also keeps the backup's instance count; when the count now is not
  the count then plus the arrivals, something was deleted, and the run lists in full (and drops
  what is gone from the cache). A deletion can only remove rows from the report, never hide a
  new record;
- another database behind the same address (restored, rebuilt): the cursor's own entry (its
  change type and resource) is checked first; if it is not there, the run lists in full.

An explicit ``study_start_date`` narrowing always lists with that query.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from .backup_target import OrthancBackup
from .treatment_report import FactCache

FULL_LISTING_ABOVE = 20000
"""Arrivals since the last run beyond which one full listing costs less than looking each
arrival up (a day of plan-context backfill can bring many image slices)."""


@dataclass
class Listing:
    resource_ids: list[str]  # every RT Record in the backup (or in the narrowed query)
    new: list[str]  # those the cache has not parsed yet
    how: str  # for the run summary


def list_backup_records(target: OrthancBackup, cache: FactCache,
                        study_start: date | None = None) -> Listing:
    known = cache.known_resources()
    if study_start is not None:
        ids = target.find_resources({"Modality": "RTRECORD",
                                     "StudyDate": f"{study_start:%Y%m%d}-"})
        return Listing(ids, [i for i in ids if i not in known],
                       f"listed in full (studies from {study_start})")
    why = "first run of this cache"
    cursor = cache.cursor()
    if cursor is not None:
        seq, fingerprint, count_then = cursor
        count_now = target.instance_count()  # before the log: see the module's notes
        if target.change_at(seq) != fingerprint:
            why = "the backup's change log is not the one the cache last read"
        else:
            changes = target.changes_since(seq)
            arrived = len(changes.new_instances)
            if count_now != count_then + arrived:
                why = (f"{count_then + arrived - count_now} instance(s) deleted from the backup "
                       "since the last run")
            elif arrived > FULL_LISTING_ABOVE:
                why = f"{arrived} instances arrived since the last run"
            else:
                new = [i for i in target.only_records(changes.new_instances) if i not in known]
                fingerprint = target.change_at(changes.last) if changes.last else None
                cache.set_cursor(changes.last, fingerprint, count_then + arrived)
                return Listing(sorted(known | set(new)), new,
                               f"{arrived} arrival(s) read from the change log")
    last = target.last_change()  # cursor first, then count, then the listing
    fingerprint = target.change_at(last) if last else None
    count = target.instance_count()
    ids = target.find_resources({"Modality": "RTRECORD"})
    cache.forget_all_but(ids)
    cache.set_cursor(last, fingerprint, count)
    return Listing(ids, [i for i in ids if i not in known], f"listed in full ({why})")
