"""Run any flow from the shell: ``python -m flows.<name> --site UCLA ...``.

Options are built from the flow's own signature, so the CLI and the Prefect UI take the same
parameters. Exit code 0 when the run completed, 1 when it failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import typing
from datetime import date, datetime
from typing import Any

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


def run_cli(flow_obj: Any, description: str, argv: list[str] | None = None) -> int:
    args = build_parser(flow_obj, description).parse_args(argv)
    try:
        # An ad-hoc run may be the first on this Prefect server: create missing R&V limits.
        ensure_rv_limits(load_site(args.site, args.config))
        result = flow_obj(**vars(args))
    except BackupError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0
