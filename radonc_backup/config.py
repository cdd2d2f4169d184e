"""Sites, their R&V sources and backup targets, from one TOML file.

The file is chosen by the ``config`` parameter of a flow, else ``$RADONC_BACKUP_CONFIG``, else
``config/environments.toml`` in the checkout, so a clinic keeps its own file outside the code.
Each top-level table is a site, except ``[defaults]`` whose keys are settings every site inherits.
Only the requested site is validated: a mistake in one site never stops another from backing up.
Secrets are never in the file: a key names an environment variable or a Prefect Secret block, and
it is read only when that peer is used.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from datetime import datetime, time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, SecretMissing

if TYPE_CHECKING:
    import threading

    from .dicom_net import DicomClient

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "config" / "environments.toml"
CONFIG_ENV = "RADONC_BACKUP_CONFIG"
STATE_DIR_ENV = "RADONC_BACKUP_STATE_DIR"

Port = Annotated[int, Field(strict=True, ge=1, le=65535)]
_AE_CHARS = re.compile(r"^[\x20-\x5b\x5d-\x7e]+$")


def _check_ae(value: str) -> str:
    if not value.strip():
        raise ValueError("AE title is empty")
    if len(value) > 16:
        raise ValueError(f"AE title {value!r} is {len(value)} characters; DICOM allows 16")
    if not _AE_CHARS.match(value):
        raise ValueError(f"AE title {value!r} has a backslash or a control character")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def rv_limit_name(aet: str) -> str:
    """The Prefect global concurrency limit that caps associations with one R&V AE."""
    return "dicom-" + re.sub(r"[^A-Za-z0-9_.-]", "_", aet.strip())


def hours_window(text: str) -> tuple[time, time]:
    """``"19:00-07:00"`` as (start, end); the window may cross midnight."""
    try:
        start, end = (time.fromisoformat(part.strip()) for part in text.split("-"))
    except ValueError:
        raise ValueError(f"hours {text!r} are not HH:MM-HH:MM") from None
    if start == end:
        raise ValueError(f"hours {text!r} start and end at the same time")
    return start, end


def within_hours(text: str, moment: datetime) -> bool:
    """Whether ``moment`` (local wall-clock time) is inside the window ``text`` (empty: always)."""
    if not text:
        return True
    start, end = hours_window(text)
    now = moment.time()
    return start <= now < end if start < end else now >= start or now < end


class DicomPeer(_Strict):
    aet: str
    ip: str
    port: Port

    @field_validator("aet")
    @classmethod
    def _valid_aet(cls, value: str) -> str:
        return _check_ae(value)

    @property
    def label(self) -> str:
        return f"{self.aet}@{self.ip}:{self.port}"


PROFILES: dict[str, dict[str, object]] = {
    "orthanc": {"query": "relational", "retrieve": "uid_list", "relational_move": True,
                "max_find_results": 0},
    "aria": {"query": "hierarchical", "retrieve": "uid_list", "relational_move": False,
             "max_find_results": 0},
    "mim": {"query": "relational", "retrieve": "uid_list", "relational_move": False,
            "max_find_results": 0},
    "strict": {"query": "hierarchical", "retrieve": "one_uid", "relational_move": False,
               "max_find_results": 500},
}
"""Per vendor profile, the defaults of a source's query settings (docs/r-and-v-compatibility.md
says which conformance statement each rests on). Keys written beside ``profile`` win."""


class _DicomSource(DicomPeer):
    description: str = ""
    profile: Literal["", "orthanc", "aria", "mim", "strict"] = ""
    """Defaults for ``query``, ``retrieve``, ``relational_move`` and ``max_find_results``
    (``PROFILES``); empty: the defaults below."""
    max_find_results: int = Field(default=0, ge=0)
    """The peer's cap on C-FIND results (0: none known); a window that returns it is split."""
    relational_move: bool = False
    """The peer accepts one IMAGE-level C-MOVE listing UIDs of many series (relational retrieve).
    ARIA does not: leave false and each series is moved with its full hierarchy."""
    query: Literal["relational", "hierarchical"] = "relational"
    """How RT Records are found: ``relational`` (one IMAGE-level C-FIND per window), or
    ``hierarchical`` for peers that accept only Study -> Series -> Image queries: each run walks
    the studies known to hold the lane's records and the studies of the last ``new_study_days``
    (docs/r-and-v-compatibility.md gives the cost); plan-context lookups walk the patient's
    studies and series."""
    new_study_days: int = Field(default=60, ge=1)
    """Hierarchical query only: studies with a StudyDate this recent are searched for RT Record
    series (a plan's study is often weeks older than its first fraction)."""
    retrieve: Literal["uid_list", "one_uid", "series"] = "uid_list"
    """How C-MOVE/C-GET names what to send: ``uid_list`` (one request per series listing its
    UIDs), ``one_uid`` (one request per instance, for peers that take a single UID), ``series``
    (one SERIES-level request per series: the whole series moves). A refused UID list is asked
    again one UID per request, and the run summary says to set ``one_uid``."""
    max_associations: int = Field(default=4, ge=1, le=64)
    """Associations all runs of all flows may hold with this AE at once (a Prefect global
    concurrency limit named by ``rv_limit_name``, created by ``deployments.register``)."""
    slot_lease_seconds: float = Field(default=60, ge=60, le=3600)
    """The association slots a run holds are a lease renewed while the run lives: a run whose
    process was killed gives its slots back within this time (plus the server's 15 s sweep).
    Prefect's server accepts 60 s at the least; its own default is 300 s."""
    image_hours: str = ""
    """Off-peak window for plan-context image series moves, e.g. "19:00-07:00" in the site's
    timezone; empty means any time. RT Records, plans, structure sets and doses always move."""

    @model_validator(mode="before")
    @classmethod
    def _profile_defaults(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("profile") in PROFILES:
            return {**PROFILES[str(data["profile"])], **data}
        return data

    @field_validator("image_hours")
    @classmethod
    def _valid_hours(cls, value: str) -> str:
        if value:
            hours_window(value)
        return value

    @property
    def limit_name(self) -> str:
        return rv_limit_name(self.aet)


class AriaSource(_DicomSource):
    """ARIA (or any Q/R SCP that can C-MOVE straight to the backup)."""

    type: Literal["aria"]


class MimSource(_DicomSource):
    """MIM: C-FIND + C-GET to us, relayed to the backup by C-STORE."""

    type: Literal["mim"]


class MosaiqSource(_Strict):
    """Mosaiq's SQL Server database, reached through ODBC."""

    type: Literal["mosaiq"]
    description: str = ""
    odbc: str
    """ODBC connection string without the password."""
    password_env: str | None = None
    password_secret: str | None = None
    login_timeout: int = Field(default=15, ge=1, le=600)
    uid_root: str = "1.2.826.0.1.3680043.8.498."
    """Root of the UIDs made for Mosaiq's records (your organisation's, ending in a dot);
    pydicom's by default. UIDs are derived from it and Mosaiq's keys: reruns make the same."""
    sessions_query: str = ""
    """Your own SQL for delivered fields (empty: ours, in radonc_backup/mosaiq.py); it must
    return the columns docs/backup.md lists and take two parameters, window start and end."""
    undated_query: str = ""
    """Your own SQL for delivered fields without a treatment date, which no window can select
    (empty: ours); the same columns, no parameter. Run by the nightly."""
    default_radiation_type: Literal["PHOTON", "ELECTRON", "PROTON", "ION", "NEUTRON"] = "PHOTON"
    """RadiationType (Type 1) of a delivered field whose Mosaiq row does not say it."""
    max_associations: int = Field(default=2, ge=1, le=64)
    """Connections all runs may hold to this database at once (a Prefect concurrency limit)."""
    slot_lease_seconds: float = Field(default=60, ge=60, le=3600)

    @field_validator("uid_root")
    @classmethod
    def _valid_root(cls, value: str) -> str:
        if not re.fullmatch(r"([1-9][0-9]*|0)(\.([1-9][0-9]*|0))*\.", value) or len(value) > 40:
            raise ValueError(f"uid_root {value!r} is not a UID root ending in a dot (at most "
                             "40 characters)")
        return value

    @property
    def label(self) -> str:
        return f"ODBC {self.odbc.split(';')[0]}"

    @property
    def limit_name(self) -> str:
        digest = hashlib.sha1(self.odbc.encode()).hexdigest()[:10]
        return f"odbc-{digest}"


Source = Annotated[Union[AriaSource, MimSource, MosaiqSource], Field(discriminator="type")]


class OrthancTarget(DicomPeer):
    type: Literal["orthanc"]
    description: str = ""
    rest_url: str
    username: str = "radonc"
    password_env: str | None = None
    password_secret: str | None = None


class DicomScpTarget(DicomPeer):
    type: Literal["dicom_scp"]
    description: str = ""


BackupTarget = Annotated[Union[OrthancTarget, DicomScpTarget], Field(discriminator="type")]


class _RestoreKeys(_Strict):
    max_associations: int = Field(default=1, ge=1, le=16)
    """Associations a restore opens to this AE at once (the backup Orthanc's C-STOREs, split
    between them; its ``ConcurrentJobs`` bounds how many run together). A restore to one of the
    site's own R&V sources also holds that many of the source's slots."""


class OrthancRestoreTarget(OrthancTarget, _RestoreKeys):
    pass


class DicomScpRestoreTarget(DicomScpTarget, _RestoreKeys):
    pass


RestoreTarget = Annotated[Union[OrthancRestoreTarget, DicomScpRestoreTarget],
                          Field(discriminator="type")]


class Settings(_Strict):
    window_overlap_minutes: int = Field(default=30, ge=0)
    """How far each incremental window reaches back before the watermark (late-written records)."""
    lookback_days: int = Field(default=1, ge=0)
    """First run of a source, and nightly default: whole days looked back over."""
    catch_up_days: int = Field(default=62, ge=0)
    """A ledger that knows no record of a lane (a first run, or a ledger lost or replaced,
    whatever the backup holds): its first run looks back this many whole days instead of
    ``lookback_days`` (records that failed before the loss are asked for again; what the
    backup holds is not moved twice). 62 covers two monthly sweeps of 31 days."""
    lane_wait_minutes: int = Field(default=30, ge=0)
    """A backup run waits this long for another run of the same lane (source to backup) to
    end before it stops with one line, having sent nothing: two runs never send the same
    objects twice."""
    ledger_copies: int = Field(default=7, ge=1)
    """The nightly run keeps a copy of the ledger in <state_dir>/ledger-copies, one per day,
    this many days."""
    patient_pass_days: int = Field(default=30, ge=0)
    """The nightly run also asks, one patient at a time and without a date, for every RT Record
    of each patient with a record in the last N days (0: no such pass). It finds what no date
    query can: records with an empty TreatmentDate, untimed records in a split day."""
    link_per_run: int = Field(default=2000, ge=1)
    """Verified RT Records whose plan reference a run reads from the backup, at most (the rest
    the next run, counted in its summary): a ledger of 100,000 unlinked records made one run
    read them all, log an error line for each and publish an event the server refused."""
    context_retry_minutes: int = Field(default=60, ge=0)
    """An incremental run also walks again a plan context left incomplete (a series missing on
    the R&V, a refused dose) once it was last walked this long ago: the 10-minute runs complete
    it soon after the R&V holds what was missing, without asking every 10 minutes."""
    retries: int = Field(default=7, ge=1)
    """Attempts for a retriable DICOM error (the legacy system's 7)."""
    retry_backoff_seconds: float = Field(default=10.0, ge=0)
    retry_jitter_factor: float = Field(default=0.5, ge=0)
    batch_size: int = Field(default=100, ge=1)
    """SOP Instance UIDs per move batch (one task)."""
    move_associations: int = Field(default=2, ge=1, le=8)
    """Associations a batch's per-series C-MOVEs are spread over (load on the R&V: keep small)."""
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=300.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    connection_timeout: float = Field(default=10.0, gt=0)
    verify_timeout: float = Field(default=30.0, ge=0)
    """How long to wait for moved objects to show up in the backup before calling them failed."""
    state_dir: str = ".state"
    skip_machines: list[str] = Field(default_factory=list)
    """Plans delivered on these machines get no plan-context backfill (counted as skipped)."""
    log_file: str = ""
    """Rotating log file of this site's runs (default: <state_dir>/logs/<site>.log)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_max_mb: float = Field(default=10.0, gt=0)
    log_backups: int = Field(default=10, ge=1)
    report_share: str = ""
    """A folder (e.g. a mounted file share) the treatment report's CSV and print view are also
    copied to; empty: none."""
    report_locale: str = "en_US"
    """The locale whose collation orders the treatment report's rows (ICU; e.g. en_US, de_DE,
    sv_SE, pl_PL): names with Å, Ł, Þ... where its readers look for them, numbers in
    natural order."""
    report_share_url: str = ""
    """How people open ``report_share`` (e.g. ``file://fileserver/radonc/reports`` or an
    intranet URL); the report's summary links the copies there."""

    @field_validator("report_locale")
    @classmethod
    def _known_locale(cls, value: str) -> str:
        from .collation import known_locale

        if not known_locale(value):
            raise ValueError(f"report_locale {value!r} is not a locale ICU has a collation "
                             "for (e.g. en_US, de_DE, sv_SE, pl_PL)")
        return value
    downtime_pack_dir: str = ""
    """Where the downtime packs go (a local disk the treatment rooms can reach without the
    network; default <state_dir>/downtime-packs); ``current`` points at the last good one."""
    downtime_pack_days: int = Field(default=7, ge=1, le=120)
    """The pack holds every patient treated in this many last days."""
    downtime_pack_refresh: bool = True
    """After each incremental run that verified something, refresh the pack for the patients
    with an instance verified since it was built (the nightly build makes the first pack)."""


class Notify(_Strict):
    """Where failure e-mail goes. Leave the table out and no mail is sent."""

    smtp_host: str
    smtp_port: Port = 25
    starttls: bool = False
    sender: str
    recipients: list[str] = Field(min_length=1)
    username: str = ""
    password_env: str | None = None
    password_secret: str | None = None
    ui_url: str = ""
    """Base URL of the Prefect UI for the link in the mail (default: Prefect's PREFECT_UI_URL)."""
    timeout: float = Field(default=30.0, gt=0)


_CRON = re.compile(r"^\S+( \S+){4}$")


class Schedules(_Strict):
    """When a site's deployments run, in the site's timezone (``deployments.register`` and
    ``deployments.serve`` read this table)."""

    incremental_minutes: int = Field(default=10, ge=1, le=1440)
    """The incremental backup's interval; a run never overlaps the one before (CANCEL_NEW)."""
    nightly: str = "0 2 * * *"
    backfill: str = "0 3 * * *"
    report: str = "0 6 * * *"
    validation: str = "0 4 * * 0"
    validation_content: str = "0 5 1 * *"
    """The monthly sweep at content depth over the last 31 days."""
    inventory: str = "0 1 15 * *"
    """The monthly inventory sweep: every RT Record the R&V holds, asked without a date."""
    fixity: str = "0 0 22 * *"
    """The monthly fixity sweep: every verified object read back and its digest checked."""
    downtime_pack: str = "30 4 * * *"
    """The nightly downtime pack, after the nightly backup and backfill."""
    dr_drill: str = "0 6 2 * *"
    """The monthly disaster-recovery drill (deployed when the site has an Orthanc restore
    target)."""

    @field_validator("nightly", "backfill", "report", "validation", "validation_content",
                     "inventory", "fixity", "downtime_pack", "dr_drill")
    @classmethod
    def _cron(cls, value: str) -> str:
        if not _CRON.match(value.strip()):
            raise ValueError(f"{value!r} is not a cron line of five fields (e.g. \"0 2 * * *\")")
        return value.strip()


class Site(_Strict):
    name: str
    description: str = ""
    timezone: str = "UTC"
    default_source: str
    default_backup: str
    script_ae: str
    sources: dict[str, Source]
    backup_targets: dict[str, BackupTarget]
    restore_targets: dict[str, RestoreTarget] = {}
    """Where the recovery flows may send the backup's objects (a rebuilt R&V, a scratch AE for
    the drill): an Orthanc (verified through its REST API) or any DICOM SCP (by C-FIND)."""
    settings: Settings = Settings()
    schedules: Schedules = Schedules()
    notify: Notify | None = None
    config_path: str = ""

    @field_validator("script_ae")
    @classmethod
    def _valid_script_ae(cls, value: str) -> str:
        return _check_ae(value)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _defaults_exist(self) -> "Site":
        if self.default_source not in self.sources:
            raise ValueError(f"default_source {self.default_source!r} is not one of the sources "
                             f"{sorted(self.sources)}")
        if self.default_backup not in self.backup_targets:
            raise ValueError(f"default_backup {self.default_backup!r} is not one of the "
                             f"backup_targets {sorted(self.backup_targets)}")
        for name, target in self.restore_targets.items():
            for alias, src in self.sources.items():
                if isinstance(src, MosaiqSource) or (src.aet, src.ip) != (target.aet, target.ip):
                    continue
                if target.max_associations > src.max_associations:
                    raise ValueError(f"restore_targets.{name} is source {alias} ({src.aet}): its "
                                     f"max_associations {target.max_associations} is more than "
                                     f"the source's {src.max_associations}")
        return self

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def source(self, alias: str | None = None) -> tuple[str, AriaSource | MimSource | MosaiqSource]:
        alias = alias or self.default_source
        if alias not in self.sources:
            raise ConfigError(f"{self.config_path}: site {self.name}: no source {alias!r} "
                              f"(sources: {sorted(self.sources)})")
        return alias, self.sources[alias]

    def backup(self, alias: str | None = None) -> tuple[str, OrthancTarget | DicomScpTarget]:
        alias = alias or self.default_backup
        if alias not in self.backup_targets:
            raise ConfigError(f"{self.config_path}: site {self.name}: no backup target "
                              f"{alias!r} (backup_targets: {sorted(self.backup_targets)})")
        return alias, self.backup_targets[alias]

    def client(self, peer: DicomPeer, query_model: str = "study",
               gate: "threading.Semaphore | None" = None) -> "DicomClient":
        """A DICOM client to one of this site's peers, as our script AE, with its timeouts
        (``gate``: a semaphore each of its associations holds while open)."""
        from .dicom_net import DicomClient, Peer, Timeouts

        s = self.settings
        return DicomClient(self.name, self.script_ae, Peer(peer.aet, peer.ip, peer.port),
                           Timeouts(s.acse_timeout, s.dimse_timeout, s.network_timeout,
                                    s.connection_timeout), query_model, gate)

    @property
    def state_dir(self) -> Path:
        override = os.environ.get(STATE_DIR_ENV)
        path = Path(override or self.settings.state_dir)
        return path if path.is_absolute() else PROJECT_ROOT / path

    @property
    def log_path(self) -> Path:
        if not self.settings.log_file:
            return self.state_dir / "logs" / f"{self.name}.log"
        path = Path(self.settings.log_file).expanduser()
        return path if path.is_absolute() else PROJECT_ROOT / path


def config_path(path: str | os.PathLike[str] | None = None) -> Path:
    chosen = path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
    return Path(chosen).expanduser().resolve()


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (set {CONFIG_ENV} or pass --config)")
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file (set {CONFIG_ENV} or "
                          "pass --config with the TOML file)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


_TYPE_TAGS = {"aria", "mim", "mosaiq", "orthanc", "dicom_scp"}


_SECRET_KEY = re.compile(r"(?i)pass|pwd|secret|token|credential")


def _describe(errors: list[Any]) -> str:
    """One line per problem naming the key; a value is shown unless the key may hold a secret."""
    lines = []
    for err in errors:
        parts = [str(p) for p in err["loc"]]
        if len(parts) > 2 and parts[0] in ("sources", "backup_targets") and parts[2] in _TYPE_TAGS:
            del parts[2]  # the discriminator pydantic inserts into the path
        loc = ".".join(parts)
        where = f"key '{loc}'" if loc else "site table"
        given = f" (given {err['input']!r})" if err["type"] != "missing" and loc else ""
        if _SECRET_KEY.search(loc):
            given = (" (value not shown; passwords never go in this file: name an environment "
                     "variable with password_env or a Prefect Secret block with password_secret)")
        lines.append(f"{where}: {err['msg']}{given}")
    return "; ".join(lines)


def site_names(path: str | os.PathLike[str] | None = None) -> list[str]:
    return [k for k, v in _read(config_path(path)).items()
            if k != "defaults" and isinstance(v, dict)]


def load_site(site: str, path: str | os.PathLike[str] | None = None) -> Site:
    """Load and validate one site; raise ConfigError naming the file, the site and the key."""
    file = config_path(path)
    data = _read(file)
    if site not in data or site == "defaults" or not isinstance(data[site], dict):
        known = ", ".join(site_names(file)) or "none"
        raise ConfigError(f"{file}: no site {site!r} (sites: {known})")
    raw = dict(data[site])
    defaults = data.get("defaults", {})
    raw["settings"] = {**defaults, **raw.get("settings", {})}
    try:
        return Site(name=site, config_path=str(file), **raw)
    except ValidationError as exc:
        raise ConfigError(f"{file}: site {site}: {_describe(exc.errors())}") from None
    except TypeError as exc:
        raise ConfigError(f"{file}: site {site}: {exc}") from None


def resolve_secret(site: Site, owner: str, password_env: str | None,
                   password_secret: str | None) -> str | None:
    """The password for one peer, from the environment or a Prefect Secret block.

    Returns None when the peer needs no password. Raises SecretMissing, naming site and peer, when
    one is configured but cannot be read.
    """
    if password_env:
        value = os.environ.get(password_env)
        if value:
            return value
        if not password_secret:
            raise SecretMissing(f"site {site.name}: {owner}: environment variable "
                                f"{password_env} is not set")
    if password_secret:
        try:
            from prefect.blocks.system import Secret

            return str(Secret.load(password_secret).get())
        except Exception as exc:  # Prefect raises ValueError or an HTTP error for a missing block
            raise SecretMissing(f"site {site.name}: {owner}: Prefect Secret block "
                                f"{password_secret!r} could not be read: {exc}") from None
    return None
