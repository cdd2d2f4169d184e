"""The backup, plan-context backfill and treatment report flows against each R&V stand-in.

Each stand-in holds the same clinic: two patients on treatment (records yesterday and today,
with plan, structure set, CT and dose), and what must not move: one patient's unplanned MR
series and a third patient's planned course that has no record yet. The source is configured
with the settings ``dicom_tools probe`` prints for that peer (its profile). For each: the
incremental run (with its backfill) ends Completed, the backup holds exactly the records and
their context, the ledger verifies them, the report lists both patients at their current
fraction, and for the in-process SCPs the C-FIND and retrieve requests stay within the bound
docs/r-and-v-compatibility.md states. Then the nightly ends plain Completed, moving nothing more,
and the inventory sweep proves every record present without asking by date.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from demo.site import DemoSite
from demo.synthetic import Patient, make_image_series, to_bytes
from flows.incremental_backup import incremental_backup
from radonc_backup.config import load_site
from radonc_backup.probe import probe
from tests.conftest import three_numbers
from tests.qr_scp import StrictQRSCP, add_source
from tests.test_backup_flows import DAY, at, course, run
from tests.test_plan_context import compressed_course

pytestmark = pytest.mark.usefixtures("prefect")


@dataclass
class Clinic:
    records: list[Dataset]
    context: list[Dataset]  # every plan-context object of the records
    unasked: list[Dataset]  # objects no record calls for
    compressed: list[Dataset] = field(default_factory=list)

    def everything(self) -> list[Dataset]:
        return [*self.records, *self.context, *self.unasked]


def clinic(compressed: bool = False) -> Clinic:
    courses = [course(f"MX{n}", at(-1, 8 + n), delivered=2) for n in range(2)]
    unplanned = make_image_series(courses[0].study, "mr-unplanned", slices=2, modality="MR")
    waiting = course("MX9", at(-1, 10), delivered=0)  # planned, not yet treated
    found = Clinic([r for c in courses for r in c.records],
                   [ds for c in courses for ds in c.context()],
                   [*unplanned.instances, *waiting.all()])
    if compressed:  # JPEG-LS, RLE and JPEG 2000 images, relayed in their own syntaxes
        images, (struct, plan, record) = compressed_course(Patient("MX5", "Compressed^Matrix"))
        found.records.append(record)
        found.context += [*images, struct, plan]
        found.compressed = images
    return found


def uids(objects: list[Dataset]) -> set[str]:
    return {str(ds.SOPInstanceUID) for ds in objects}


# stand-in -> (SCP options, source type, source settings as probe prints them)
STRICT = {
    "hierarchical-only": ({"hierarchical_only": True}, "aria", {"profile": "strict"}),
    "one-uid-per-retrieve": ({"single_uid": True}, "aria", {"retrieve": "one_uid"}),
    "silent-cap": ({"cap": 4}, "aria", {"max_find_results": 4}),
    "c-get-only-compressed": ({"get_only": True}, "mim", {"profile": "mim"}),
}


def finish(site: DemoSite, world: Clinic, source: str) -> None:
    """Run the incremental (with its backfill) and check what a user would: the run's state,
    the backup's content, the ledger, the report."""
    state = run(incremental_backup, site, at(0, 16), source=source)
    assert state.is_completed(), state.message
    assert state.result()["plan_context"].startswith("Completed"), state.result()
    held = site.backup.sop_instance_uids()
    assert held == uids(world.records) | uids(world.context), "exactly what was asked for"
    assert not held & uids(world.unasked)
    assert three_numbers(site, world.records, DAY.date(), world.context) == (0, 0, 0)
    if world.compressed:
        from tests.test_plan_context import assert_arrived_intact

        assert_arrived_intact(site, world.compressed)


def then_nightly_and_inventory(site: DemoSite, world: Clinic, source: str) -> None:
    """The rest of the matrix, on the same peer and settings: the nightly after the incremental
    moves nothing more and ends plain Completed (its per-patient pass and fraction continuity
    find nothing missing), and the inventory sweep, asking without a date, proves every record
    present in the backup."""
    from flows.inventory_sweep import inventory_sweep
    from flows.nightly_backup import nightly_backup

    before = site.backup.sop_instance_uids()
    nightly = run(nightly_backup, site, at(1, 5), days=1, source=source)
    assert nightly.is_completed() and nightly.name == "Completed", nightly.message
    sweep = inventory_sweep(site="DEMO", source=source, config=str(site.config_path),
                            return_state=True)
    assert sweep.is_completed(), sweep.message
    assert f"lists ({len(world.records)}) is in backup orthanc (presence checked)" in str(
        sweep.message), sweep.message
    assert site.backup.sop_instance_uids() == before


def bounds(world: Clinic, hierarchical: bool, catch_up_days: int = 62) -> tuple[int, int]:
    """The C-FIND and retrieve requests one incremental run with its backfill may send, as
    docs/r-and-v-compatibility.md states them. The run is the first of a new ledger: it looks
    back ``catch_up_days`` whole days. Relational: one C-FIND per day (catch_up_days + 2 here),
    per plan 3 (plan, structure set, doses) + 2 per image series. Hierarchical: 1 + studies +
    record series for the records, per plan 1 + 4 per study of the patient + 2 x (3 + image
    series). Both: at most 3 more per record, plan and image series, for the answers that may
    have been cut and are checked in parts. Retrieves: at most one per record and, per plan,
    one each for the plan, structure set and doses and one per image series."""
    plans = {str(r.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID) for r in world.records}
    images = {str(ds.SeriesInstanceUID) for ds in world.context
              if ds.Modality not in ("RTPLAN", "RTSTRUCT", "RTDOSE")}
    studies = {str(ds.StudyInstanceUID) for ds in world.everything()}
    record_series = {str(r.SeriesInstanceUID) for r in world.records}
    retrieves = len(world.records) + 3 * len(plans) + len(images)
    checks = 3 * (len(world.records) + len(plans) + len(images))
    if not hierarchical:
        return catch_up_days + 2 + 3 * len(plans) + 2 * len(images) + checks, retrieves
    return (1 + len(studies) + len(record_series)
            + len(plans) * (1 + 4 + 2 * 3) + 2 * len(images) + checks, retrieves)


@pytest.mark.parametrize("stand_in", sorted(STRICT))
def test_each_in_process_stand_in_within_the_stated_requests(
        make_site: Callable[..., DemoSite], stand_in: str) -> None:
    options, kind, settings = STRICT[stand_in]
    world = clinic(compressed=kind == "mim")
    site = make_site(extra_backup_modalities={"MATRIX_RV": ("MATRIX_RV", "127.0.0.1", 1)})
    server = StrictQRSCP("MATRIX_RV", world.everything(),
                         {site.backup.aet: ("127.0.0.1", site.backup.dicom_port)}, **options)
    add_source(site, server, "matrix", kind, **settings)
    with server:
        finish(site, world, "matrix")
        incremental = len(server.finds), len(server.moves), server.refused_finds
        then_nightly_and_inventory(site, world, "matrix")
    if kind == "mim":  # relayed through the spool on disk, which is left empty
        spool = Path(site.workdir) / "state" / "spool"
        assert spool.is_dir() and not any(p.is_file() for p in spool.rglob("*"))
    finds, retrieves = bounds(world, settings.get("profile") == "strict")
    assert incremental[2] == 0 and server.refused_finds == 0
    assert incremental[0] <= finds, (incremental[0], finds, server.finds)
    assert incremental[1] <= retrieves, (incremental[1], retrieves)


def printed_settings(lines: list[str]) -> dict[str, object]:
    """The settings lines probe prints (``key = value  # why``), as values."""
    out: dict[str, object] = {}
    for line in lines:
        key, _, value = line.split("#")[0].partition("=")
        out[key.strip()] = int(value) if value.strip().isdigit() else value.strip(' "')
    return out


def test_dcmqrscp_stand_in(make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    from tests.dcmqrscp import Dcmqrscp

    world = clinic()
    site = make_site(extra_backup_modalities={"DCMQR_RV": ("DCMQR_RV", "127.0.0.1", 1)})
    with Dcmqrscp(tmp_path / "dcmqrscp", "DCMQR_RV",
                  {site.backup.aet: ("127.0.0.1", site.backup.dicom_port)}) as rv:
        rv.store(world.everything())
        # As a user would: probe with no profile (it fails, and prints what fits), then the
        # source with the settings it printed.
        add_source(site, rv, "plain")  # type: ignore[arg-type]
        cfg = load_site("DEMO", site.config_path)
        report = probe(cfg.client(cfg.sources["plain"]), cfg.sources["plain"], DAY.date())
        assert not report.works
        assert any("ignores TreatmentDate" in c.found for c in report.checks), report.checks
        settings = printed_settings(report.settings)
        assert settings.get("profile") == "strict", report.settings
        add_source(site, rv, "dcmqr", **settings)  # type: ignore[arg-type]
        finish(site, world, "dcmqr")
        then_nightly_and_inventory(site, world, "dcmqr")


def test_orthanc_stand_in(make_site: Callable[..., DemoSite]) -> None:
    world = clinic()
    site = make_site()
    site.rv.upload([to_bytes(ds) for ds in world.everything()])
    finish(site, world, "aria")
    then_nightly_and_inventory(site, world, "aria")
