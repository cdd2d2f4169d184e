"""Run any flow from the shell: ``python -m flows.<name> --site UCLA ...``.

Options are built from the flow's own signature, so the CLI and the Prefect UI take the same
parameters. Exit code 0 when the run completed, 1 when it failed, 2 for bad arguments, 3 when a
backup run verified every record but its plan-context backfill did not complete (the run's state
is ``Completed (context incomplete)``).

The Prefect server named by ``PREFECT_API_URL`` may be down with everything else on the day of a
network-wide outage. A flow that reads only the backup (the treatment report) then runs with a
temporary local Prefect and says so; the others stop with one line, since their R&V load limits
and run history live on the server.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
import typing
from datetime import date, datetime
from typing import Any

import httpx
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.backup_run import CONTEXT_INCOMPLETE
from radonc_backup.config import load_site
from radonc_backup.errors import BackupError
from tasks.limits import ensure_rv_limits

_CONVERTERS: dict[type, Any] = {int: int, float: float, str: str,
                                datetime: datetime.fromisoformat, date: date.fromisoformat}


def _base_type(hint: Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def build_parser(flow_obj: Any, description: str) -> argparse.ArgumentParser:
    fn = flow_obj.fn
    hints = typing.get_type_hints(fn)
    parser = argparse.ArgumentParser(prog=f"python -m {fn.__module__}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, param in inspect.signature(fn).parameters.items():
        base = _base_type(hints.get(name, str))
        if base is bool:
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name,
                                action=argparse.BooleanOptionalAction, default=param.default)
            continue
        required = param.default is inspect.Parameter.empty
        if typing.get_origin(base) is list:
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, nargs="+",
                                default=param.default, help="one or more values")
            continue
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, required=required,
                            type=_CONVERTERS.get(base, str),
                            default=None if required else param.default,
                            help=f"{base.__name__}" + ("" if required else
                                                       f" (default: {param.default})"))
    return parser


def server_unreachable(api: str) -> str | None:
    """Why the Prefect API at ``api`` cannot be used, or None when it answers."""
    try:
        response = httpx.get(api.rstrip("/") + "/health", timeout=5)
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return None if response.status_code == 200 else f"HTTP {response.status_code}"


def run_cli(flow_obj: Any, description: str, argv: list[str] | None = None, *,
            uses_rv: bool = True, runs_without_server: bool = False) -> int:
    args = build_parser(flow_obj, description).parse_args(argv)
    local = contextlib.nullcontext()
    try:
        site = load_site(args.site, args.config)
        api = str(PREFECT_API_URL.value() or "")
        down = server_unreachable(api) if api else None
        if down and not runs_without_server:
            print(f"FAILED: site {site.name}: Prefect server {api} is unreachable ({down}): "
                  "start it (docs/operations.md), or unset PREFECT_API_URL to run with a "
                  "temporary local Prefect", file=sys.stderr)
            return 1
        if down:
            print(f"site {site.name}: Prefect server {api} is unreachable ({down}): running "
                  f"{flow_obj.name} with a temporary local Prefect instead; this run will not "
                  "be in the server's run history", file=sys.stderr)
            local = temporary_settings(updates={PREFECT_API_URL: None})
        with local:
            if uses_rv:  # an ad-hoc run may be the first on this server: create missing limits
                ensure_rv_limits(site)
            state = flow_obj(**vars(args), return_state=True)
            result = state.result(raise_on_failure=False)
    except BackupError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    if not state.is_completed():
        print(f"FAILED: {result if isinstance(result, BaseException) else state.message}",
              file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str))
    if state.name == CONTEXT_INCOMPLETE:
        print(f"{CONTEXT_INCOMPLETE}: {state.message}", file=sys.stderr)
        return 3
    return 0
