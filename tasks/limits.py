"""Load protection: runs that talk to an R&V AE hold slots of a Prefect global limit.

One limit per R&V AE (``dicom-<AET>``, size ``max_associations`` from the source's config) is
shared by every run of every flow and every worker, so a nightly sweep, a backfill and the
10-minute backup together never open more associations than the clinic allows. Slots are taken
with ``concurrency(..., strict=True)``: a missing limit is a setup error, never a silent "no
limit". Slots are leased and renewed while held, so a killed run frees its slots within the
source's ``slot_lease_seconds`` (default 60) plus the server's sweep of expired leases (15 s).
``deployments.register`` creates the limits; ad-hoc CLI runs and the demo create missing ones.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar

from prefect.client.orchestration import get_client
from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound

from radonc_backup.config import AriaSource, MimSource, MosaiqSource, Site
from radonc_backup.errors import ConfigError
from radonc_backup.lane import LaneBusy, OpenLane, lane_lock

REGISTER_HINT = "python -m deployments.register"
_held: ContextVar[frozenset[str]] = ContextVar("radonc_backup_rv_slots", default=frozenset())


@contextmanager
def rv_slots(source: AriaSource | MimSource | MosaiqSource, occupy: int = 1) -> Iterator[None]:
    """Hold ``occupy`` associations' worth of the source's limit while the block runs.

    A flow takes its slots once, first thing, before it starts any task run: on a SQLite-backed
    server a slot request that meets the server writing task runs fails with 503 and Prefect's
    client waits ~2 s before asking again (measured). Inside a block that already holds this
    limit (a backfill subflow of a backup run) nothing more is taken: the subflow works within
    its parent's share while the parent waits for it. Never asks for more than the limit holds,
    so it can always be granted; a failed lease renewal does not kill a long C-MOVE half way.
    """
    held = _held.get()
    if source.limit_name in held:
        yield
        return
    with ExitStack() as stack:
        try:
            stack.enter_context(concurrency(source.limit_name,
                                            occupy=min(occupy, source.max_associations),
                                            lease_duration=source.slot_lease_seconds,
                                            strict=True, raise_on_lease_renewal_failure=False))
        except ConcurrencySlotAcquisitionError as exc:
            missing = any(w in str(exc).lower() for w in ("404", "not found", "must be created"))
            raise ConfigError(
                f"R&V {source.label}: Prefect global concurrency limit {source.limit_name!r} "
                + (f"is missing on this Prefect server: create it with {REGISTER_HINT} "
                   if missing else "refused the request for association slots ")
                + f"({exc})") from None
        token = _held.set(held | {source.limit_name})
        try:
            yield
        finally:
            _held.reset(token)


def holding(source: AriaSource | MimSource | MosaiqSource) -> bool:
    """Whether this run already holds slots of the source's limit (a subflow of a run)."""
    return source.limit_name in _held.get()


def rv_limits(site: Site) -> dict[str, int]:
    """The limit name and size for each source of a site (a Mosaiq source's: connections)."""
    return {src.limit_name: src.max_associations for src in site.sources.values()}


def ensure_rv_limits(site: Site, update: bool = False) -> dict[str, int]:
    """Create the site's R&V limits that are missing (and with ``update``, resize existing ones
    to the config). Returns each limit's size on the server."""
    sizes = {}
    with get_client(sync_client=True) as client:
        for name, size in rv_limits(site).items():
            if update:
                client.upsert_global_concurrency_limit_by_name(name, size)
                sizes[name] = size
                continue
            try:
                sizes[name] = client.read_global_concurrency_limit_by_name(name).limit
            except ObjectNotFound:
                client.upsert_global_concurrency_limit_by_name(name, size)
                sizes[name] = size
    return sizes



@contextmanager
def held_for(site: Site, aet: str, host: str, associations: int = 1) -> Iterator[None]:
    """A restore to one of the site's own R&V sources (same AE title and host) holds as many of
    that source's association slots as it opens, like a backup run; another target needs none."""
    for src in site.sources.values():
        if not isinstance(src, MosaiqSource) and src.aet == aet and src.ip == host:
            with rv_slots(src, occupy=associations):
                yield
            return
    yield


def lane_limit_name(lane: OpenLane) -> str:
    """The Prefect global limit of one lane (size 1): ``lane-<site>-<source>-<backup>``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_",
                  f"lane-{lane.lane.site}-{lane.lane.source}-{lane.lane.backup}")


@contextmanager
def one_run_of(lane: OpenLane, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """One run of a lane at a time, on this machine and across machines.

    On this machine, ``lane_lock`` (a ``flock`` the kernel frees when the process dies, with
    the holder named); across machines (a shell run beside a worker's run, two workers), the
    lane's slot of a Prefect global limit of size 1, leased like the R&V slots so that a run
    whose machine died frees it within its lease. Together they wait ``lane_wait_minutes``,
    then stop with one line, having sent nothing."""
    wait = lane.site.settings.lane_wait_minutes * 60
    started = time.monotonic()
    name = lane_limit_name(lane)
    with lane_lock(lane, wait, on_wait), ExitStack() as stack:
        with get_client(sync_client=True) as client:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                client.upsert_global_concurrency_limit_by_name(name, 1)
        try:
            stack.enter_context(concurrency(
                name, occupy=1, timeout_seconds=max(1.0, wait - (time.monotonic() - started)),
                lease_duration=lane.source.slot_lease_seconds, strict=True,
                raise_on_lease_renewal_failure=False))
        except TimeoutError:
            raise LaneBusy(f"site {lane.site.name}: another run of {lane.lane.source} to "
                           f"{lane.lane.backup} is under way on another machine (Prefect limit "
                           f"{name}) and did not end within {wait:.0f} s: this run sent "
                           "nothing; run it again later") from None
        yield
