"""Recording found RT Records before anything moves, and batching them for delivery.

Finding is ``record_finder``'s (one finder: strategy, caps, splitting, screening); moving and
verifying is ``transfer.deliver``'s. The rule kept here: what is found is written to the ledger
before anything is moved, so every later run retries it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from .instance import InstanceRef
from .ledger import LaneLedger


def batches(refs: Iterable[InstanceRef], size: int) -> list[list[InstanceRef]]:
    """Batches of at most ``size``, series kept together so each C-MOVE lists many UIDs."""
    ordered = sorted(refs, key=lambda r: (r.series_key, r.sop_instance_uid))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


@dataclass
class Plan:
    """What a run must do after finding: the lane's unverified rows, new and old."""

    found: int
    new: int
    already_verified: int
    todo: list[InstanceRef]


def plan_work(ledger: LaneLedger, found: list[InstanceRef]) -> Plan:
    """Record what was found, then take every unverified row of the lane (earlier failures too)."""
    new = ledger.record_found(found)
    states = ledger.states([r.sop_instance_uid for r in found])
    already = sum(1 for s in states.values() if s == "verified")
    return Plan(found=len(found), new=new, already_verified=already, todo=ledger.unverified())


def window_label(start: datetime, end: datetime) -> str:
    return f"{start:%Y-%m-%d %H:%M:%S} to {end:%Y-%m-%d %H:%M:%S}"
