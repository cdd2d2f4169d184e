"""Give the Prefect server a PostgreSQL database: ``python -m deployments.prefect_database``.

Prefect's server on SQLite, with the deployments, automations and a worker of one site, logged
"database is locked" and dropped events within an hour; Prefect recommends PostgreSQL for
anything beyond one user. Run as root on the server's machine, after ``bash bootstrap.sh setup``
(which installs Debian's ``postgresql``):

1. creates (or, run again, keeps) the login role and the database, owned by that role, with the
   ``pg_trgm`` extension Prefect needs; a new role gets a random password;
2. writes ``PREFECT_API_DATABASE_CONNECTION_URL`` to the server unit's environment file (mode
   0600): the password lives there and nowhere else, and is never printed.

The administrator's connection is Debian's: ``psql`` as the ``postgres`` system user over the
local socket (``runuser -u postgres``). ``--admin-url`` names another (a libpq URL; its password
from ``PGPASSWORD`` or ``~/.pgpass``), as the test suite does with a cluster of its own.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

ENV_KEY = "PREFECT_API_DATABASE_CONNECTION_URL"
DEFAULT_ENV_FILE = "/etc/radonc-backup/prefect-server.env"
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class SetupError(Exception):
    """One line for the operator: what failed, never a password."""


def connection_url(user: str, password: str, host: str, port: int, database: str) -> str:
    return (f"postgresql+asyncpg://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@{host}:{port}/{database}")


def _psql(admin_url: str | None, sql: str, database: str = "postgres",
          env: dict[str, str] | None = None) -> str:
    if admin_url:
        argv = ["psql", admin_url.rsplit("/", 1)[0] + f"/{database}"]
    else:
        argv = ["runuser", "-u", "postgres", "--", "psql", "-d", database]
    # The SQL goes in on stdin: a password on psql's command line is visible in /proc.
    done = subprocess.run([*argv, "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"], input=sql,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise SetupError(f"psql ({database}): {last}")
    return done.stdout.strip()


def ensure_database(user: str, database: str, admin_url: str | None = None,
                    admin_env: dict[str, str] | None = None) -> str | None:
    """Create the role (with a new random password, returned) and the database if missing;
    None when the role existed (its password is kept: it is in the env file already).
    ``admin_env``: added to psql's environment (``PGPASSWORD`` for ``admin_url``)."""

    def psql(sql: str, db: str = "postgres") -> str:
        return _psql(admin_url, sql, db, admin_env)

    for name in (user, database):
        if not _NAME.match(name):
            raise SetupError(f"{name!r}: use lowercase letters, digits and _ for names")
    password = None
    if psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{user}'") != "1":
        password = secrets.token_urlsafe(24)
        psql(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'")
    if psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}'") != "1":
        psql(f"CREATE DATABASE {database} OWNER {user} ENCODING 'UTF8' TEMPLATE template0")
    psql("CREATE EXTENSION IF NOT EXISTS pg_trgm", database)
    return password


def write_env_file(path: Path, url: str) -> None:
    """Set ``ENV_KEY`` in the unit's environment file, other lines kept; mode 0600."""
    lines = path.read_text().splitlines() if path.exists() else []
    lines = [line for line in lines if not line.startswith(f"{ENV_KEY}=")] + [f"{ENV_KEY}={url}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.prefect_database",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-file", default=DEFAULT_ENV_FILE,
                        help=f"the server unit's EnvironmentFile (default {DEFAULT_ENV_FILE})")
    parser.add_argument("--database", default="prefect")
    parser.add_argument("--user", default="prefect")
    parser.add_argument("--host", default="127.0.0.1", help="where the server connects")
    parser.add_argument("--port", type=int, default=5432)
    parser.add_argument("--admin-url", default=None,
                        help="libpq URL of an administrator (default: psql as user postgres)")
    args = parser.parse_args(argv)
    env_file = Path(args.env_file)
    try:
        password = ensure_database(args.user, args.database, args.admin_url)
        if password is None:
            if ENV_KEY in (env_file.read_text() if env_file.exists() else ""):
                print(f"database {args.database}: exists; {env_file} already points the "
                      "server at it")
                return 0
            raise SetupError(f"role {args.user} exists but {env_file} has no {ENV_KEY}: set a "
                             f"new password (ALTER ROLE {args.user} PASSWORD ...) and write the "
                             "URL there, or drop the role and run this again")
        write_env_file(env_file, connection_url(args.user, password, args.host, args.port,
                                                args.database))
    except (SetupError, OSError, subprocess.SubprocessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"database {args.database} (role {args.user}, pg_trgm) on {args.host}:{args.port}; "
          f"{ENV_KEY} written to {env_file} (mode 0600)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
