"""DICOM tools for the shell: echo, find, move, get, store, check and probe a site's peers.

What clinics used ``dicom_utils`` for, through the same network layer the flows use, so a
physicist tests exactly what a backup run will do. A peer is a configured alias of the site
(``aria``, ``orthanc``...) or an explicit ``AET@host:port``.

Exit codes scripts can rely on:
  0  done
  1  the peer refused (rejected AE, refused request, unknown destination)
  2  usage or configuration error
  3  the peer is down, unreachable, aborted or timed out (worth retrying later)
  4  partly done (some sub-operations or stores failed)

Output never shows a patient name unless asked for with ``-k PatientName``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.datadict import keyword_dict, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from .config import AriaSource, DicomPeer, MimSource, MosaiqSource, OrthancTarget, Site, \
    load_site, resolve_secret
from .dicom_net import DicomClient, Peer, Timeouts, dimse_log, identifier
from .errors import BackupError, ConfigError, DicomError, RetriableDicomError
from .ledger import Ledger
from .probe import probe

OK, REFUSED, USAGE, UNREACHABLE, PARTIAL = 0, 1, 2, 3, 4

RETURN_KEYS = {
    "PATIENT": ["PatientID"],
    "STUDY": ["PatientID", "StudyInstanceUID", "StudyDate", "StudyDescription"],
    "SERIES": ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
               "NumberOfSeriesRelatedInstances"],
    "IMAGE": ["PatientID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"],
}
_EXPLICIT_PEER = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


class UsageError(BackupError):
    """The command line names something that does not exist or cannot work."""


def resolve_peer(peer: str, site: Site | None) -> DicomPeer:
    """An alias of the site's sources or backup targets, or an explicit ``AET@host:port``."""
    match = _EXPLICIT_PEER.match(peer)
    if match:
        return DicomPeer(aet=match["aet"], ip=match["host"], port=int(match["port"]))
    if site is None:
        raise UsageError(f"peer {peer!r} is not AET@host:port; give --site to use an alias")
    found = site.sources.get(peer) or site.backup_targets.get(peer)
    if found is None:
        raise UsageError(f"site {site.name}: no peer {peer!r} (sources: {sorted(site.sources)}, "
                         f"backup_targets: {sorted(site.backup_targets)})")
    if not isinstance(found, DicomPeer):
        raise UsageError(f"site {site.name}: {peer!r} is a {found.type} source, not a DICOM peer")
    return found


def make_client(args: argparse.Namespace, site: Site | None) -> DicomClient:
    peer = resolve_peer(args.peer, site)
    if site is not None:
        client = site.client(peer, args.model)
        if args.calling_ae:
            client.calling_ae = args.calling_ae
        return client
    return DicomClient("(none)", args.calling_ae or "RADONC_BACKUP",
                       Peer(peer.aet, peer.ip, peer.port),
                       Timeouts(args.timeout, args.timeout * 10, args.timeout * 2, args.timeout),
                       args.model)


def parse_keys(pairs: Sequence[str], level: str) -> Dataset:
    """``-k Key=Value`` pairs (``Key`` or ``Key=`` asks for it back) over the level's defaults."""
    keys: dict[str, str] = {k: "" for k in RETURN_KEYS[level]}
    for pair in pairs:
        name, _, value = pair.partition("=")
        name = name.strip()
        if tag_for_keyword(name) is None:  # pydicom would keep it as a plain attribute, unsent
            close = difflib.get_close_matches(name, keyword_dict.keys(), n=1)
            raise UsageError(f"-k {name}: not a DICOM keyword"
                             + (f" (did you mean {close[0]}?)" if close else ""))
        keys[name] = value
    try:
        return identifier(level, **keys)
    except (AttributeError, ValueError) as exc:
        raise UsageError(f"bad -k key: {exc}") from None


def table(rows: list[dict[str, str]], columns: list[str]) -> str:
    widths = [max([len(c), *(len(r.get(c, "")) for r in rows)]) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(r.get(c, "").ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def emit(args: argparse.Namespace, text: str, data: object) -> None:
    """What a command prints: text for people, or with ``--json`` the same facts for scripts."""
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else text)


_SAFE_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def file_name_for(uid: object) -> str:
    """A file name from a SOP Instance UID sent by a peer: only a well-formed UID is used as is
    (a peer's ``../../x`` must not write outside the folder)."""
    text = str(uid or "")
    if _SAFE_UID.match(text) and len(text) <= 64:
        return f"{text}.dcm"
    import hashlib

    return f"invalid-uid-{hashlib.sha256(text.encode('utf-8', 'replace')).hexdigest()[:16]}.dcm"


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value)


def cmd_echo(args: argparse.Namespace, site: Site | None) -> int:
    client = make_client(args, site)
    start = time.perf_counter()
    status = client.echo()
    took = (time.perf_counter() - start) * 1000
    emit(args, f"C-ECHO {client.calling_ae} -> {client.peer.label}: status 0x{status:04X} "
         f"({took:.0f} ms)", {"peer": client.peer.label, "calling_ae": client.calling_ae,
                              "status": status, "ms": round(took)})
    return OK if status == 0 else REFUSED


def cmd_find(args: argparse.Namespace, site: Site | None) -> int:
    client = make_client(args, site)
    query = parse_keys(args.key, args.level)
    columns = [e.keyword for e in query if e.keyword != "QueryRetrieveLevel"]
    rows = [{c: _text(m, c) for c in columns} for m in client.find(query)]
    emit(args, table(rows, columns) + f"\n{len(rows)} match(es) at {args.level} level from "
         f"{client.peer.label}", {"peer": client.peer.label, "level": args.level,
                                  "matches": rows})
    return OK


def cmd_move(args: argparse.Namespace, site: Site | None) -> int:
    client = make_client(args, site)
    query = parse_keys(args.key, args.level)
    [result] = client.move([query], args.dest)
    emit(args, "\n".join([
        f"C-MOVE {client.peer.label} -> {args.dest}: status 0x{result.status:04X}, "
        f"completed {result.completed}, failed {result.failed}, warning {result.warning}",
        *(f"  failed: {uid}" for uid in result.failed_uids),
        "(a move status is not proof of arrival: check the destination)"]),
        {"peer": client.peer.label, "destination": args.dest, "status": result.status,
         "completed": result.completed, "failed": result.failed, "warning": result.warning,
         "failed_uids": list(result.failed_uids)})
    return OK if result.claims_success else PARTIAL


def cmd_get(args: argparse.Namespace, site: Site | None) -> int:
    client = make_client(args, site)
    query = parse_keys(args.key, args.level)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(ds: Dataset) -> None:
        path = out / file_name_for(ds.get("SOPInstanceUID"))
        ds.save_as(path, enforce_file_format=True)
        written.append(path)

    result = client.get(query, save)
    emit(args, f"C-GET {client.peer.label}: status 0x{result.status:04X}, completed "
         f"{result.completed}, failed {result.failed}, warning {result.warning}; "
         f"{len(written)} file(s) written to {out}",
         {"peer": client.peer.label, "status": result.status, "completed": result.completed,
          "failed": result.failed, "warning": result.warning,
          "files": [str(p) for p in written]})
    if result.status >> 12 == 0xC and not written:
        return REFUSED
    return OK if result.claims_success else PARTIAL


def _dicom_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"{given}: no such file or folder")
    return files


def cmd_store(args: argparse.Namespace, site: Site | None) -> int:
    client = make_client(args, site)
    datasets, unreadable = [], []
    for path in _dicom_files(args.files):
        try:
            datasets.append(dcmread(path))
        except (InvalidDicomError, OSError, ValueError) as exc:
            unreadable.append(f"{path}: not a readable DICOM file ({exc})")
    results = client.store(datasets) if datasets else []
    rows = [{"SOPInstanceUID": r.sop_instance_uid,
             "status": "-" if r.status is None else f"0x{r.status:04X}",
             "result": "stored" if r.ok else r.error} for r in results]
    stored = sum(r.ok for r in results)
    emit(args, "\n".join([table(rows, ["SOPInstanceUID", "status", "result"]),
                          *(f"skipped {line}" for line in unreadable),
                          f"{stored} of {len(results) + len(unreadable)} file(s) stored at "
                          f"{client.peer.label}"]),
         {"peer": client.peer.label, "stored": stored, "results": rows,
          "skipped": unreadable})
    if stored == len(results) and not unreadable:
        return OK
    return PARTIAL if stored else REFUSED


def _check_dicom(site: Site, peer: DicomPeer) -> str:
    status = site.client(peer).echo()
    return "answers C-ECHO" if status == 0 else f"C-ECHO status 0x{status:04X}"


def _check_orthanc_rest(site: Site, alias: str, target: OrthancTarget) -> str:
    from .backup_target import OrthancBackup

    backup = OrthancBackup(site, alias, target)
    try:
        version = backup.version()
    finally:
        backup.close()
    return f"REST answers (Orthanc {version})"


def _check_odbc(site: Site, alias: str, source: MosaiqSource) -> str:
    import pyodbc

    password = resolve_secret(site, f"source {alias}", source.password_env,
                              source.password_secret)
    conn_str = source.odbc + (f";PWD={password}" if password else "")
    try:
        with pyodbc.connect(conn_str, timeout=int(site.settings.connection_timeout)) as conn:
            conn.execute("SELECT 1").fetchone()
    except pyodbc.Error as exc:
        raise ConfigError(f"site {site.name}: source {alias} ({source.label}): {exc}") from None
    return "ODBC connection answers"


def check_site(site: Site) -> list[dict[str, str]]:
    """Ask every peer of the site whether it answers; one row per peer, never raises for a peer."""
    checks: list[tuple[str, str, str, Callable[[], str]]] = []
    for alias, source in site.sources.items():
        if isinstance(source, MosaiqSource):
            checks.append((alias, source.type, source.label,
                           lambda a=alias, s=source: _check_odbc(site, a, s)))
        else:
            checks.append((alias, source.type, source.label,
                           lambda s=source: _check_dicom(site, s)))
    for alias, target in site.backup_targets.items():
        checks.append((alias, target.type, target.label, lambda t=target: _check_dicom(site, t)))
        if isinstance(target, OrthancTarget):
            checks.append((alias, "orthanc REST", target.rest_url,
                           lambda a=alias, t=target: _check_orthanc_rest(site, a, t)))
    rows = []
    for alias, kind, where, check in checks:
        try:
            rows.append({"peer": alias, "kind": kind, "address": where, "ok": "yes",
                         "result": check()})
        except BackupError as exc:
            rows.append({"peer": alias, "kind": kind, "address": where, "ok": "NO",
                         "result": str(exc)})
    return rows


def cmd_check(args: argparse.Namespace, site: Site | None) -> int:
    if site is None:
        raise UsageError("check needs --site")
    rows = check_site(site)
    failing = [r["peer"] for r in rows if r["ok"] != "yes"]
    emit(args, table(rows, ["peer", "kind", "address", "ok", "result"])
         + f"\nsite {site.name}: {len(rows) - len(failing)} of {len(rows)} checks answer"
         + (f"; not answering: {', '.join(failing)}" if failing else ""),
         {"site": site.name, "checks": rows, "not_answering": failing})
    return OK if not failing else UNREACHABLE


def cmd_probe(args: argparse.Namespace, site: Site | None) -> int:
    if site is None:
        raise UsageError("probe needs --site")
    alias, source = site.source(args.source)
    if not isinstance(source, (AriaSource, MimSource)):
        raise UsageError(f"site {site.name}: source {alias} is of type {source.type}: probe "
                         "checks DICOM Q/R sources (aria, mim)")
    today = datetime.now(site.tz).date()
    report = probe(site.client(source), source, today)
    rows = [{"check": c.name, "verdict": c.verdict, "found": c.found} for c in report.checks]
    verdict = (f"site {site.name}: source {alias} ({report.peer}) "
               + ("works with this configuration" if report.works else
                  "will NOT work with this configuration: see the FAIL lines"))
    settings = "".join(f"\n  {line}" for line in report.settings)
    emit(args, table(rows, ["check", "verdict", "found"])
         + (f"\nsettings that fit [{site.name}.sources.{alias}]:{settings}" if settings else "")
         + f"\n{verdict}",
         {"site": site.name, "source": alias, "peer": report.peer, "checks": rows,
          "settings": report.settings, "works": report.works})
    return OK if report.works else REFUSED


def fraction_numbers(text: str) -> list[int]:
    """``6`` or ``6,8-9`` as [6, 8, 9]."""
    numbers: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            numbers += range(int(first), int(last or first) + 1)
    except ValueError:
        raise UsageError(f"--fractions {text!r}: give fraction numbers like 6 or 6,8-9") from None
    if not numbers or min(numbers) < 1:
        raise UsageError(f"--fractions {text!r}: fraction numbers start at 1")
    return sorted(set(numbers))


def cmd_acknowledge(args: argparse.Namespace, site: Site | None) -> int:
    """Keep an operator's word that fractions of a plan will never be in the backup."""
    if site is None:
        raise UsageError("acknowledge-fractions needs --site")
    if not args.note.strip():
        raise UsageError("--note: say why these fractions will never be in the backup")
    fractions = fraction_numbers(args.fractions)
    by = args.by or os.environ.get("SUDO_USER") or os.environ.get("USER") or "unknown"
    ledger = Ledger.for_state_dir(site.state_dir)
    added = ledger.acknowledge_fractions(site.name, args.patient, args.plan, fractions,
                                         args.note.strip(), by)
    held = sorted(ledger.acknowledged_fractions(site.name).get((args.patient, args.plan), ()))
    emit(args, f"site {site.name}: patient {args.patient}, plan {args.plan}: {added} fraction(s) "
               f"newly acknowledged by {by}; acknowledged now: {', '.join(map(str, held))} "
               f"(fraction continuity no longer names them; kept in {ledger.path})",
         {"site": site.name, "patient": args.patient, "plan": args.plan, "added": added,
          "acknowledged": held, "by": by})
    return OK


def cmd_pack_status(args: argparse.Namespace, site: Site | None) -> int:
    """Where the last good downtime pack is and how old: the runbook's first step when the R&V
    is down (no network, no Prefect needed)."""
    from datetime import timezone

    from .downtime_pack import status

    if site is None:
        raise UsageError("downtime-pack needs --site")
    root = Path(site.settings.downtime_pack_dir or site.state_dir / "downtime-packs")
    found = status(root)
    if found.folder is None:
        emit(args, f"site {site.name}: no downtime pack in {root} (build one: python -m "
                   f"flows.downtime_pack --site {site.name})", {"site": site.name, "pack": None})
        return REFUSED
    age = ""
    if found.built is not None:
        minutes = (datetime.now(timezone.utc) - found.built).total_seconds() / 60
        age = f", built {found.built:%Y-%m-%d %H:%M} UTC ({minutes:.0f} min ago)"
    emit(args, f"site {site.name}: downtime pack {found.folder}{age}; sheets of "
               f"{found.patients} patient(s), newest record {found.as_of or 'none'} (site time): "
               f"open <patient>/sheet.html", {
                   "site": site.name, "pack": str(found.folder),
                   "built_utc": found.built.isoformat() if found.built else None,
                   "patients": found.patients, "as_of": found.as_of})
    return OK


def _common(parser: argparse.ArgumentParser, peer: bool = True) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log the DIMSE exchange to stderr (-vv: every PDU, identifiers "
                             "included)")
    parser.add_argument("--site", help="site table in the config (enables peer aliases)")
    parser.add_argument("--config", help="sites TOML (default: $RADONC_BACKUP_CONFIG or "
                                         "config/environments.toml)")
    if peer:
        parser.add_argument("peer", help="a peer alias of the site, or AET@host:port")
        parser.add_argument("--calling-ae", help="our AE title (default: the site's script_ae)")
        parser.add_argument("--model", choices=["study", "patient"], default="study",
                            help="query/retrieve information model (default: study root)")
        parser.add_argument("--timeout", type=float, default=10.0,
                            help="seconds, for explicit peers without --site (default 10)")


def _query_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--level", type=str.upper, choices=list(RETURN_KEYS), default="STUDY")
    parser.add_argument("-k", "--key", action="append", default=[], metavar="Key=Value",
                        help="a matching key (Key=Value) or a key to return (Key); repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m radonc_backup.dicom_tools",
        description="DICOM tools against a site's peers, through RadOnc Backup's network layer.",
        epilog="exit codes: 0 done, 1 refused, 2 usage/config error, 3 unreachable or "
               "aborted (retry later), 4 partly done")
    commands = parser.add_subparsers(dest="command", required=True)
    echo = commands.add_parser("echo", help="C-ECHO a peer")
    _common(echo)
    echo.set_defaults(run=cmd_echo)
    find = commands.add_parser("find", help="C-FIND and print the matches as a table")
    _common(find)
    _query_args(find)
    find.set_defaults(run=cmd_find)
    move = commands.add_parser("move", help="C-MOVE matches to a destination AE")
    _common(move)
    _query_args(move)
    move.add_argument("--dest", required=True, help="move destination AE title")
    move.set_defaults(run=cmd_move)
    get = commands.add_parser("get", help="C-GET matches into a folder")
    _common(get)
    _query_args(get)
    get.add_argument("--out", required=True, help="folder for the received files")
    get.set_defaults(run=cmd_get)
    store = commands.add_parser("store", help="C-STORE files or folders of files")
    _common(store)
    store.add_argument("files", nargs="+", help="DICOM files or folders")
    store.set_defaults(run=cmd_store)
    check = commands.add_parser("check", help="echo every peer of a site and report what answers")
    _common(check, peer=False)
    check.set_defaults(run=cmd_check)
    probe_cmd = commands.add_parser(
        "probe", help="check that a source's Q/R service answers the way the backup needs "
                      "(moves nothing) and print the settings that fit")
    _common(probe_cmd, peer=False)
    probe_cmd.add_argument("source", nargs="?", help="source alias (default: the site's "
                                                      "default source)")
    probe_cmd.set_defaults(run=cmd_probe)
    ack = commands.add_parser(
        "acknowledge-fractions",
        help="say that fractions of a plan will never be in the backup (delivered elsewhere, a "
             "plan that goes on counting), so fraction continuity stops naming them")
    _common(ack, peer=False)
    ack.add_argument("--patient", required=True, help="PatientID, as the warning names it")
    ack.add_argument("--plan", required=True,
                     help="plan SOP Instance UID, as the warning names it ('' for none)")
    ack.add_argument("--fractions", required=True, help="e.g. 6 or 6,8-9")
    ack.add_argument("--note", required=True, help="why (kept with the acknowledgement)")
    ack.add_argument("--by", help="who acknowledges (default: the login name)")
    ack.set_defaults(run=cmd_acknowledge)
    pack = commands.add_parser(
        "downtime-pack", help="where the last good downtime pack is, how old, how fresh its "
                              "sheets are (R&V down: the first step)")
    _common(pack, peer=False)
    pack.set_defaults(run=cmd_pack_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with dimse_log(sys.stderr, args.verbose):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        site = load_site(args.site, args.config) if args.site else None
        return int(args.run(args, site))
    except (UsageError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    except RetriableDicomError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return UNREACHABLE
    except DicomError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return REFUSED


if __name__ == "__main__":
    sys.exit(main())
