"""A print view of the treatment report (HTML), for a clinic whose screens are down.

Rendered with Jinja2 (autoescaped: names and labels come from DICOM files) from the same rows and
columns as the CSV. Every column has a fixed share of the page width and its values wrap, so the
page fits A4 and Letter, landscape and portrait (tests/test_print_views.py prints it with
headless Chromium and reads it back with pdftotext).
"""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from .treatment_report import COLUMNS, UNREADABLE

PRINTED = list(COLUMNS)
WIDTHS = {"PatientID": 6, "PatientName": 8, "RTPlanLabel": 6, "Machine": 6,
          "CurrentFraction": 4, "FractionsPlanned": 4, "FractionsRemaining": 4,
          "LastTreatment": 6, "LastMeterset": 5, "LastTermination": 6, "Status": 6,
          "Warnings": 10, "SessionsInWindow": 4, "FirstTreatment": 6, "BirthDate": 5, "Sex": 3,
          "Physician": 6, "PlanUID": 5}  # percent of the page width; they add up to 100
assert sum(WIDTHS.values()) == 100 and set(WIDTHS) == set(PRINTED)
NUMERIC = {"CurrentFraction", "FractionsPlanned", "FractionsRemaining", "LastMeterset",
           "SessionsInWindow"}
_ENV = Environment(loader=PackageLoader("radonc_backup", "templates"),
                   autoescape=select_autoescape(["html", "j2"]))


def render_html(report: pd.DataFrame, site: str, backup: str, start: date, end: date,
                generated: datetime) -> str:
    rows = report.astype(object).where(report.notna(), "").to_dict(orient="records")
    attention = sum(1 for r in rows if r["Warnings"] or r["Status"] == UNREADABLE)
    return _ENV.get_template("treatment_report.html.j2").render(
        site=site, backup=backup, start=start, end=end, rows=rows, columns=PRINTED, widths=WIDTHS,
        numeric=NUMERIC, attention=attention, generated=f"{generated:%Y-%m-%d %H:%M}")


def write_html(path: Path, html: str) -> Path:
    path.write_text(html, encoding="utf-8")
    return path
