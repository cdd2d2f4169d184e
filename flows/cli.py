"""Run any flow from the shell: ``python -m flows.<name> --site UCLA ...``.

Options are built from the flow's own signature, so the CLI and the Prefect UI take the same
parameters. Exit code 0 when the run completed, 1 when it failed, 2 for bad arguments
(argparse's, an unknown site, a sites file that cannot be loaded: nothing ran), 3 when a
backup run verified every record but its plan-context backfill did not complete (the run's state
is ``Completed (context incomplete)``) or the backup's records skip a fraction (``Completed
(fraction gaps)``).

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
import logging
import sys
import typing
from collections.abc import Iterator
from datetime import date, datetime
from typing import Any

import httpx
from prefect.settings import (PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_API_REQUEST_TIMEOUT,
                              PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES,
                              PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
                              PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
                              temporary_settings)

from flows import ONE_LINE_ERROR
from flows.backup_run import CONTEXT_INCOMPLETE, FRACTION_GAPS, UNPROVEN
from radonc_backup.config import load_site
from radonc_backup.errors import BackupError, ConfigError
from tasks.limits import ensure_rv_limits

_CONVERTERS: dict[type, Any] = {int: int, float: float, str: str,
                                datetime: datetime.fromisoformat, date: date.fromisoformat}


def _base_type(hint: Any) -> type:
    if typing.get_origin(hint) is typing.Literal:
        return hint  # type: ignore[no-any-return]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def build_parser(flow_obj: Any, description: str) -> argparse.ArgumentParser:
    fn = flow_obj.fn
    hints = typing.get_type_hints(fn)
    spec = fn.__globals__.get("__spec__")  # run as ``python -m``, the module is "__main__"
    module = spec.name if spec is not None else fn.__module__
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, param in inspect.signature(fn).parameters.items():
        base = _base_type(hints.get(name, str))
        if base is bool:
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name,
                                action=argparse.BooleanOptionalAction, default=param.default)
            continue
        required = param.default is inspect.Parameter.empty
        if typing.get_origin(base) is typing.Literal:  # one of a few words: a bad one exits 2
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, required=required,
                                choices=list(typing.get_args(base)),
                                default=None if required else param.default)
            continue
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


def _drop_run_errors(record: logging.LogRecord) -> bool:
    return not getattr(record, ONE_LINE_ERROR, False)


def _print_errors_once() -> None:
    """The shell prints a failed run's error as its ``FAILED:`` line; the console does not
    echo the run's own record of it (the run's log in Prefect and the site log keep it)."""
    for handler in logging.getLogger().handlers:
        if _drop_run_errors not in handler.filters:
            handler.addFilter(_drop_run_errors)


EPHEMERAL_TIMED_OUT = "Timed out while attempting to connect to ephemeral Prefect API server"


def ephemeral_advice() -> str:
    """What to do when Prefect's temporary local server did not come up in time."""
    waited = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    return (f"the temporary local Prefect server did not answer within {waited} s (a busy "
            "machine?): run again, set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher, "
            "or start a Prefect server (docs/operations.md) and set PREFECT_API_URL")


SHELL_HEARTBEAT_SECONDS = 30
"""How often a run started from the shell on a server sends a heartbeat: Prefect's least, so
never less often than the deployments' runs crash-notice's sweep is told of."""


@contextlib.contextmanager
def watched(on_server: bool) -> Iterator[None]:
    """A shell run on the server carries the deployments' heartbeat tag and beats every
    ``SHELL_HEARTBEAT_SECONDS``: if its process dies (kill -9, the machine), crash-notice's
    sweep marks it Crashed as it does a deployment's run, instead of it staying Running."""
    if not on_server:
        yield
        return
    from prefect import tags

    from flows.crash_notice import HEARTBEAT_TAG

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY:
                                     SHELL_HEARTBEAT_SECONDS}), tags(HEARTBEAT_TAG):
        yield


def run_cli(flow_obj: Any, description: str, argv: list[str] | None = None, *,
            uses_rv: bool = True, runs_without_server: bool = False) -> int:
    args = build_parser(flow_obj, description).parse_args(argv)
    _print_errors_once()
    local = contextlib.nullcontext()
    try:
        site = load_site(args.site, args.config)
    except ConfigError as exc:  # an unknown site or an unreadable sites file: nothing ran
        print(f"FAILED: {exc}", file=sys.stderr)
        return 2
    try:
        api = str(PREFECT_API_URL.value() or "")
        down = server_unreachable(api) if api else None
        if down and not runs_without_server:
            print(f"FAILED: site {site.name}: Prefect server {api} is unreachable ({down}): "
                  "start it (docs/operations.md), or unset PREFECT_API_URL to run with a "
                  "temporary local Prefect", file=sys.stderr)
            return 1
        if down:
            # Never the server's own database (PREFECT_HOME's, when the server runs on this
            # machine but cannot be reached): a database of the site's own state directory.
            offline = site.state_dir / "prefect-offline" / "prefect.db"
            offline.parent.mkdir(parents=True, exist_ok=True)
            print(f"site {site.name}: Prefect server {api} is unreachable ({down}): running "
                  f"{flow_obj.name} with a temporary local Prefect instead; this run's history "
                  f"is kept in {offline}, not in the server's", file=sys.stderr)
            local = temporary_settings(updates={
                PREFECT_API_URL: None,
                PREFECT_API_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{offline}"})
        with local, watched(bool(api) and not down):
            if uses_rv:  # an ad-hoc run may be the first on this server: create missing limits
                ensure_rv_limits(site)
            state = flow_obj(**vars(args), return_state=True)
            result = state.result(raise_on_failure=False)
    except BackupError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    except httpx.TransportError as exc:  # the server stopped answering: one line, no traceback
        waited = PREFECT_API_REQUEST_TIMEOUT.value()
        print(f"FAILED: site {site.name}: Prefect server {api} did not answer "
              f"({type(exc).__name__}, {waited:g} s a request, "
              f"{PREFECT_CLIENT_MAX_RETRIES.value()} retries): {flow_obj.name} stopped. Nothing "
              "it had not verified in the backup is marked done; the next run takes it up. "
              "Check the server (docs/operations.md)", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        if not str(exc).startswith(EPHEMERAL_TIMED_OUT):
            raise
        print(f"FAILED: site {site.name}: {ephemeral_advice()}", file=sys.stderr)
        return 1
    if not state.is_completed():
        print(f"FAILED: {result if isinstance(result, BaseException) else state.message}",
              file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str))
    if state.name in (CONTEXT_INCOMPLETE, FRACTION_GAPS, UNPROVEN):
        print(f"{state.name}: {state.message}", file=sys.stderr)
        return 3
    return 0
