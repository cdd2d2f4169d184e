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


def missing_fractions(numbers: Iterable[int | None]) -> list[int]:
    """The fraction numbers from 1 to the highest held that no record holds."""
    held = {n for n in numbers if n is not None and n > 0}
    return [n for n in range(1, max(held) + 1) if n not in held] if held else []


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


def gap_warning(numbers: Iterable[int | None]) -> str:
    """The report's warning for one plan's fractions, or '' when they are continuous."""
    missing = missing_fractions(numbers)
    return (f"fraction(s) {spans(missing)} not in the backup (fraction continuity): find "
            "them on the R&V, or acknowledge them") if missing else ""
