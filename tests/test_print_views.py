"""The print views (treatment report and downtime sheet) on A4 and Letter, landscape and
portrait: printed to PDF by headless Chromium, read back with pdftotext, every value of every
column on the page and no word beyond its edge."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import datetime, timedelta
from html import unescape
from pathlib import Path

import pandas as pd
import pytest

from demo.synthetic import Patient, make_course, make_treatment_record
from radonc_backup.downtime_pack import sheet
from radonc_backup.report_facts import plan_facts, record_facts
from radonc_backup.report_print import PRINTED, render_html
from radonc_backup.treatment_report import build_report, facts_frame
from radonc_backup.treatment_sheet import plan_sheet

PAPERS = ["A4 portrait", "A4 landscape", "letter portrait", "letter landscape"]
START = datetime(2026, 11, 16, 8, 30)
CHROMIUM = shutil.which("chromium") or "chromium"  # bootstrap.sh test installs it


def clinic() -> tuple[pd.DataFrame, list]:
    """Rows as wide as a clinic makes them: long names (non-ASCII too), a long warning, an
    interrupted last session, two plans of one patient."""
    courses = [
        make_course(Patient("PRINT-000000000001", "Vandenberghe-Oosterhuis^Maximiliaan^Jan"),
                    START, delivered=5, fractions=25, slices=1, label="PROSTATE_NODES"),
        make_course(Patient("PRINT2", "Łukasiewicz^Zoë"), START, delivered=3, fractions=3,
                    slices=1, machine="TrueBeam-Linac-Room-2", label="SBRT_SPINE_T12"),
    ]
    c = courses[0]
    c.records.append(make_treatment_record(c.study, c.plan, 6, START + timedelta(days=5),
                                           termination="MACHINE"))
    records = [r for c in courses for r in c.records]
    plans = {str(c.plan.SOPInstanceUID): plan_facts(c.plan) for c in courses}
    report = build_report(facts_frame(record_facts(r) for r in records), plans, START.date(),
                          (START + timedelta(days=6)).date())
    return report, courses


def pdf_words(html: str, paper: str, folder: Path) -> tuple[float, list[tuple[float, float, str]],
                                                             str]:
    """Print ``html`` on ``paper`` with headless Chromium; the page width, every word with its
    left and right edge, and the whole text without white space."""
    page = folder / "page.html"
    page.write_text(html.replace("</head>", f"<style>@page {{ size: {paper}; }}</style></head>"),
                    encoding="utf-8")
    pdf = folder / "page.pdf"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                    "--no-pdf-header-footer", f"--user-data-dir={folder / 'profile'}",
                    f"--print-to-pdf={pdf}", page.as_uri()], check=True, capture_output=True,
                   timeout=120)
    box = subprocess.run(["pdftotext", "-bbox", str(pdf), "-"], check=True, capture_output=True,
                         text=True).stdout
    width = float(re.search(r'<page width="([\d.]+)"', box).group(1))  # type: ignore[union-attr]
    words = [(float(a), float(b), unescape(w)) for a, b, w in re.findall(
        r'<word xMin="([\d.]+)" yMin="[\d.]+" xMax="([\d.]+)" yMax="[\d.]+">([^<]*)</word>', box)]
    raw = subprocess.run(["pdftotext", "-raw", str(pdf), "-"], check=True, capture_output=True,
                         text=True).stdout
    return width, words, re.sub(r"\s+", "", raw)


def on_the_page(value: object, text: str) -> bool:
    """A value wrapped anywhere in its cell is still there, read in order without spaces."""
    return re.sub(r"\s+", "", str(value)) in text


@pytest.mark.parametrize("paper", PAPERS)
def test_the_report_print_view_fits_the_paper(paper: str, tmp_path: Path) -> None:
    report, _ = clinic()
    html = render_html(report, "DEMO", "orthanc", START.date(), (START + timedelta(days=6)).date(),
                       datetime(2026, 11, 22, 7, 0))
    width, words, text = pdf_words(html, paper, tmp_path)
    beyond = [w for left, right, w in words if left < 0 or right > width + 0.5]
    assert not beyond, f"{paper}: beyond the page edge: {beyond[:10]}"
    rows = report.astype(object).where(report.notna(), "").to_dict(orient="records")
    missing = [(column, row[column]) for row in rows for column in PRINTED
               if str(row[column]) and not on_the_page(row[column], text)]
    assert not missing, f"{paper}: not on the page: {missing[:10]}"
    assert all(on_the_page(column, text) for column in PRINTED)


@pytest.mark.parametrize("paper", PAPERS)
def test_the_downtime_sheet_fits_the_paper(paper: str, tmp_path: Path) -> None:
    report, courses = clinic()
    c = courses[0]
    rows = report.astype(object).where(report.notna(), "").to_dict(orient="records")
    mine = [r for r in rows if r["PatientID"] == "PRINT-000000000001"]
    s = plan_sheet(c.plan, c.records)
    html = sheet(mine, [(mine[0], s)], "DEMO", "orthanc", datetime(2026, 11, 22, 7, 0))
    width, words, text = pdf_words(html, paper, tmp_path)
    beyond = [w for left, right, w in words if left < 0 or right > width + 0.5]
    assert not beyond, f"{paper}: beyond the page edge: {beyond[:10]}"
    expected = ["PRINT-000000000001", mine[0]["PlanUID"], mine[0]["Warnings"],
                "50 Gy in 25 fractions of 2 Gy", "Next fraction 7 of 25", s.beams[-1].flag,
                *[b.name for b in s.beams], "VACUUM_MOLD Vac-Lok 1"]
    missing = [v for v in expected if not on_the_page(v, text)]
    assert not missing, f"{paper}: not on the page: {missing}"
