"""docs/performance.md is shared by the benchmarks: each replaces only its own section."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, heading: str, lines: list[str]) -> None:
    """Put ``lines`` (starting with ``heading``) in place of that section, keeping the others."""
    text = path.read_text() if path.exists() else "# Performance\n\n"
    head, _, tail = text.partition(heading)
    rest = "## " + tail.split("\n## ", 1)[1] if "\n## " in tail else ""
    body = "\n".join(lines).rstrip() + "\n"
    path.write_text(head.rstrip() + "\n\n" + body + ("\n" + rest if rest else ""))
