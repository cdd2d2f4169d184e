"""A print view of the treatment report (HTML, landscape), for a clinic whose screens are down.

Rendered with Jinja2 (autoescaped: names and labels come from DICOM files) from the same rows as
the CSV; the UID column is left out of the page (it is in the CSV).
"""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from .treatment_report import COLUMNS, UNREADABLE

PRINTED = [c for c in COLUMNS if c not in ("PlanUID",)]
NUMERIC = {"CurrentFraction", "FractionsPlanned", "FractionsRemaining", "LastMeterset",
           "SessionsInWindow"}
_ENV = Environment(loader=PackageLoader("radonc_backup", "templates"),
                   autoescape=select_autoescape(["html", "j2"]))


def render_html(report: pd.DataFrame, site: str, backup: str, start: date, end: date,
                generated: datetime) -> str:
    rows = report.astype(object).where(report.notna(), "").to_dict(orient="records")
    attention = sum(1 for r in rows if r["Warnings"] or r["Status"] == UNREADABLE)
    return _ENV.get_template("treatment_report.html.j2").render(
        site=site, backup=backup, start=start, end=end, rows=rows, columns=PRINTED,
        numeric=NUMERIC, attention=attention, generated=f"{generated:%Y-%m-%d %H:%M}")


def write_html(path: Path, html: str) -> Path:
    path.write_text(html, encoding="utf-8")
    return path
