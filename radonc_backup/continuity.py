"""Fraction continuity: a second proof that the backup holds every delivered fraction, one
that does not ask the R&V by date (and so does not share the date queries' blind spots).

Each RT Beams Treatment Record carries the fraction it delivered (CurrentFractionNumber). For
one patient's plan, the backup's records should hold every fraction from 1 to the highest:
a gap (5 and 7 without 6), or fractions below the first one held, names records the backup
lacks, whatever the date queries found. A plan whose numbering does not start at 1 (a revised
plan that goes on counting) shows as a gap too, until an operator acknowledges it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .report_facts import RecordFacts, fetch_facts

if TYPE_CHECKING:
    from .backup_target import OrthancBackup

Course = tuple[str, str]  # (PatientID, plan SOP Instance UID)


class FactStore(Protocol):
    """Where parsed records are kept (the treatment report's cache)."""

    def known_resources(self) -> set[str]: ...
    def put_records(self, items: Iterable[tuple[str, RecordFacts]]) -> None: ...
    def fractions(self, resource_ids: Iterable[str]) -> dict[Course, list[int]]: ...


@dataclass(frozen=True)
class Gap:
    """Fractions of one patient's plan that no record in the backup holds."""

    patient_id: str
    plan_uid: str
    missing: tuple[int, ...]

    def __str__(self) -> str:
        return (f"patient {self.patient_id}, plan {self.plan_uid or '(no plan reference)'}: "
                f"fraction(s) {spans(list(self.missing))} not in the backup")


def missing_fractions(numbers: Iterable[int | None],
                      acknowledged: Iterable[int] = ()) -> list[int]:
    """The fraction numbers from 1 to the highest held that no record holds, less those an
    operator acknowledged as never to be in the backup."""
    held = {n for n in numbers if n is not None and n > 0} | set(acknowledged)
    return [n for n in range(1, max(held) + 1) if n not in held] if held else []


def gaps(fractions: dict[Course, list[int]],
         acknowledged: dict[Course, set[int]]) -> list[Gap]:
    """Every course whose fractions are not continuous, acknowledged fractions aside."""
    out = []
    for (patient, plan), numbers in sorted(fractions.items()):
        missing = missing_fractions(numbers, acknowledged.get((patient, plan), ()))
        if missing:
            out.append(Gap(patient, plan, tuple(missing)))
    return out


def backup_gaps(target: OrthancBackup, store: FactStore, patient_ids: Iterable[str],
                acknowledged: dict[Course, set[int]]) -> tuple[list[Gap], dict[str, str]]:
    """Fraction continuity of these patients over every RT Record the backup holds of them.

    Reads from the backup alone (its index lists each patient's records; records not parsed
    before are fetched and parsed into ``store``), so it shares no blind spot with the date
    queries that found the records. Returns the gaps and, per record the backup could not
    serve, why (such a record is named, its fractions cannot count).
    """
    wanted = sorted({p for p in patient_ids if p})
    known = store.known_resources()
    listed = [rid for p in wanted
              for rid in target.find_resources({"PatientID": p, "Modality": "RTRECORD"})]
    parsed, unreadable = fetch_facts(target, [r for r in listed if r not in known])
    store.put_records(parsed)
    held = {course: numbers for course, numbers in store.fractions(listed).items()
            if course[0] in wanted}  # a wildcard character in an ID matches more: keep exact
    return gaps(held, acknowledged), unreadable


def spans(numbers: list[int]) -> str:
    """``[1, 2, 3, 6]`` as ``1-3, 6``: short enough for a report cell."""
    out: list[str] = []
    for n in sorted(numbers):
        if out and out[-1].split("-")[-1] == str(n - 1):
            first = out[-1].split("-")[0]
            out[-1] = f"{first}-{n}"
        else:
            out.append(str(n))
    return ", ".join(out)


def gap_warning(numbers: Iterable[int | None], acknowledged: Iterable[int] = ()) -> str:
    """The report's warning for one plan's fractions, or '' when they are continuous."""
    missing = missing_fractions(numbers, acknowledged)
    return (f"fraction(s) {spans(missing)} not in the backup (fraction continuity): find "
            "them on the R&V, or acknowledge them") if missing else ""
