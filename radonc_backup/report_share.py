"""Copies of a report where people can open them, and the links the run summary gives.

A path on a worker's disk is no use to a physicist's browser: a site may name a share
(``report_share``, a mounted folder) and the address people open it by (``report_share_url``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import quote

from .errors import ConfigError


def share_copies(share: str, files: list[Path]) -> list[Path]:
    """Copy ``files`` into the share folder (nothing when no share is set)."""
    if not share:
        return []
    folder = Path(share).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy2(f, folder / f.name)) for f in files]
    except OSError as exc:
        raise ConfigError(f"report_share {folder}: cannot copy the report there: "
                          f"{exc.strerror or exc}") from None


def where_to_open(share_url: str, shared: list[Path], local: list[Path]) -> str:
    """Markdown lines: links to the shared copies, or the worker's paths when there is no share."""
    if shared and share_url:
        base = share_url.rstrip("/")
        return "\n".join(f"- [{p.name}]({base}/{quote(p.name)})" for p in shared) + "\n"
    if shared:
        return "\n".join(f"- `{p}` (share)" for p in shared) + "\n"
    return ("On the worker's disk (set `report_share` to copy them where people can open them):"
            "\n\n" + "\n".join(f"- `{p}`" for p in local) + "\n")
