"""The DICOM tools against a real Orthanc pair: readable output and exit codes scripts can use."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from demo.orthanc import free_port
from demo.site import DemoSite
from demo.synthetic import Patient, make_course
from radonc_backup.dicom_tools import OK, PARTIAL, REFUSED, UNREACHABLE, USAGE, file_name_for, \
    main
from tests.conftest import load

ROOT = Path(__file__).resolve().parent.parent
COURSE = make_course(Patient("TOOL001", "Tool^Patient^Middle"), datetime(2026, 11, 2, 8),
                     delivered=3, slices=3)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_echo_by_alias_and_explicit_peer(make_site: Callable[..., DemoSite],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    site = make_site()
    code, out, _ = run(capsys, "echo", "aria", "--site", "DEMO", "--config", str(site.config_path))
    assert code == OK and f"RV_DEMO@127.0.0.1:{site.rv.dicom_port}" in out and "0x0000" in out

    code, out, _ = run(capsys, "echo", f"BACKUP_DEMO@127.0.0.1:{site.backup.dicom_port}")
    assert code == OK


def test_wrong_ae_unreachable_peer_and_unknown_alias_exit_codes(
        make_site: Callable[..., DemoSite], capsys: pytest.CaptureFixture[str]) -> None:
    site = make_site()
    code, _, err = run(capsys, "echo", f"WRONG_AE@127.0.0.1:{site.rv.dicom_port}")
    assert code == REFUSED
    assert "called AE title not recognised" in err and "WRONG_AE" in err

    port = free_port()
    code, _, err = run(capsys, "echo", f"RV_DEMO@127.0.0.1:{port}", "--timeout", "2")
    assert code == UNREACHABLE and f"RV_DEMO@127.0.0.1:{port}" in err

    code, _, err = run(capsys, "echo", "nosuch", "--site", "DEMO",
                       "--config", str(site.config_path))
    assert code == USAGE and "no peer 'nosuch'" in err and "aria" in err


def test_find_prints_a_table_without_patient_names(make_site: Callable[..., DemoSite],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    site = make_site()
    load(site, COURSE)
    code, out, _ = run(capsys, "find", "aria", "--site", "DEMO", "--config",
                       str(site.config_path), "--level", "image", "-k", "PatientID=TOOL001",
                       "-k", "Modality=RTRECORD", "-k", "TreatmentDate")
    assert code == OK
    assert "SOPInstanceUID" in out.splitlines()[0] and "TreatmentDate" in out.splitlines()[0]
    for record in COURSE.records:
        assert str(record.SOPInstanceUID) in out
    assert "3 match(es) at IMAGE level" in out
    assert "Tool" not in out


def test_move_get_and_store(make_site: Callable[..., DemoSite], tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    site = make_site()
    load(site, COURSE)
    cfg = ["--site", "DEMO", "--config", str(site.config_path)]
    plan = COURSE.plan
    code, out, _ = run(capsys, "move", "aria", *cfg, "--dest", "BACKUP_DEMO", "--level",
                       "series", "-k", f"StudyInstanceUID={plan.StudyInstanceUID}",
                       "-k", f"SeriesInstanceUID={plan.SeriesInstanceUID}")
    assert code == OK and "completed 1, failed 0" in out
    assert str(plan.SOPInstanceUID) in site.backup.sop_instance_uids()

    out_dir = tmp_path / "got"
    code, out, _ = run(capsys, "get", "aria", *cfg, "--out", str(out_dir), "--level", "study",
                       "-k", f"StudyInstanceUID={plan.StudyInstanceUID}")
    assert code == OK
    assert {p.stem for p in out_dir.iterdir()} == {str(ds.SOPInstanceUID) for ds in COURSE.all()}

    (out_dir / "notes.txt").write_text("not DICOM")
    code, out, _ = run(capsys, "store", "orthanc", *cfg, str(out_dir))
    assert code == PARTIAL and "notes.txt" in out
    assert site.backup.sop_instance_uids() == {str(ds.SOPInstanceUID) for ds in COURSE.all()}


def test_check_reports_what_answers(make_site: Callable[..., DemoSite],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    site = make_site()
    cfg = ["--site", "DEMO", "--config", str(site.config_path)]
    code, out, _ = run(capsys, "check", *cfg)
    assert code == OK and "3 of 3 checks answer" in out and "REST answers (Orthanc" in out

    site.rv.stop()
    code, out, _ = run(capsys, "check", *cfg)
    assert code == UNREACHABLE and "not answering: aria" in out


def test_help_and_exit_code_from_the_shell(make_site: Callable[..., DemoSite]) -> None:
    site = make_site()
    for command in ("echo", "find", "move", "get", "store", "check"):
        shown = subprocess.run([sys.executable, "-m", "radonc_backup.dicom_tools", command,
                                "--help"], cwd=ROOT, capture_output=True, text=True)
        assert shown.returncode == 0 and "--site" in shown.stdout
    refused = subprocess.run([sys.executable, "-m", "radonc_backup.dicom_tools", "find",
                              f"NOT_RV@127.0.0.1:{site.rv.dicom_port}", "-k", "PatientID=X"],
                             cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == REFUSED and "NOT_RV" in refused.stderr


def test_a_misspelled_key_is_refused_and_json_and_verbose_output(
        make_site: Callable[..., DemoSite], capsys: pytest.CaptureFixture[str]) -> None:
    site = make_site()
    load(site, COURSE)
    cfg = ("--site", "DEMO", "--config", str(site.config_path))
    code, out, err = run(capsys, "find", "aria", *cfg, "-k", "PatientNme=X")
    assert code == USAGE and out == ""
    assert "-k PatientNme: not a DICOM keyword (did you mean PatientName?)" in err

    code, out, _ = run(capsys, "find", "aria", *cfg, "--json", "-k", "PatientID=TOOL001")
    found = json.loads(out)
    assert code == OK and [m["PatientID"] for m in found["matches"]] == ["TOOL001"]
    assert found["matches"][0]["StudyInstanceUID"] == str(COURSE.plan.StudyInstanceUID)

    code, out, err = run(capsys, "echo", "aria", *cfg, "--json", "-v")
    assert code == OK and json.loads(out)["status"] == 0
    assert "Association Accepted" in err or "Requesting Association" in err, err[-1000:]

    # pynetdicom's account of the exchange names no patient at -v; -vv shows the identifiers.
    query = ("find", "aria", *cfg, "--json", "-k", "PatientID=TOOL001", "-k", "PatientName=")
    code, out, err = run(capsys, *query, "-v")
    assert code == OK and "Tool^Patient^Middle" in out
    assert "Find Request" in err and "Tool^Patient" not in err, err[-1000:]
    code, out, err = run(capsys, *query, "-vv")
    assert code == OK and "Tool^Patient^Middle" in err
    code, out, err = run(capsys, *query)
    assert code == OK and err == ""


def test_a_peer_uid_never_names_a_file_outside_the_folder() -> None:
    assert file_name_for("1.2.840.10008.1") == "1.2.840.10008.1.dcm"
    for hostile in ("../../x", "/etc/passwd", "1.2/../3", "", "1." + "2" * 80):
        name = file_name_for(hostile)
        assert name.startswith("invalid-uid-") and "/" not in name and ".." not in name
