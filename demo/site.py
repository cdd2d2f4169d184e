"""The demo site: an Orthanc standing in for the R&V, a backup Orthanc, and a config for both.

The shipped ``config/environments.toml`` describes the DEMO site on fixed loopback ports; this
module starts both servers on free ports and writes a copy of that site with the real ports, so
the demo and the tests run the same code a clinic runs, against real DICOM servers.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.data import get_testdata_file

from radonc_backup.config import DEFAULT_CONFIG

from .orthanc import OrthancServer, free_port

DEMO_PASSWORD_ENV = "RADONC_DEMO_BACKUP_PASSWORD"
PYDICOM_RT_SAMPLES = ["rtplan.dcm", "rtstruct.dcm", "rtdose.dcm", "CT_small.dcm"]


def refuse_modality_lua(modality: str) -> str:
    """A backup that refuses one modality, as a misconfigured PACS would (Lua filter)."""
    return ("function ReceivedInstanceFilter(dicom, origin, info)\n"
            f"  if dicom.Modality == '{modality}' then return false end\n"
            "  return true\nend\n")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML writing for config files: scalars, lists and nested tables."""
    scalars = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    out = []
    if scalars:
        if prefix:
            out.append(f"[{prefix}]")
        out += scalars
        out.append("")
    for key, value in data.items():
        if isinstance(value, dict):
            out.append(dump_toml(value, f"{prefix}.{key}" if prefix else key))
    return "\n".join(out)


@dataclass
class DemoSite:
    rv: OrthancServer
    backup: OrthancServer
    config_path: Path
    workdir: Path
    site: str = "DEMO"

    def stop(self) -> None:
        self.rv.remove()
        self.backup.remove()


def demo_site_table(source_config: Path = DEFAULT_CONFIG) -> dict[str, Any]:
    with source_config.open("rb") as fh:
        data = tomllib.load(fh)
    return {"defaults": data.get("defaults", {}), "DEMO": data["DEMO"]}


def start_demo_site(workdir: Path, backup_lua: list[str] | None = None, rv_find_cap: int = 0,
                    settings: dict[str, Any] | None = None, extra_rv_modalities:
                    dict[str, tuple[str, str, int]] | None = None,
                    schedules: dict[str, Any] | None = None,
                    extra_backup_modalities: dict[str, tuple[str, str, int]] | None = None,
                    dicom_threads: int = 4) -> DemoSite:
    """Start the Orthanc pair and write ``workdir/environments.toml`` for site DEMO
    (``dicom_threads``: the associations each Orthanc serves at once)."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = demo_site_table()
    demo = data["DEMO"]
    src = demo["sources"][demo["default_source"]]
    tgt = demo["backup_targets"][demo["default_backup"]]
    script_ae = demo["script_ae"]
    backup_port = free_port()
    rv = OrthancServer(src["aet"], workdir=workdir / "rv", limit_find_instances=rv_find_cap,
                       dicom_threads=dicom_threads,
                       modalities={tgt["aet"]: (tgt["aet"], "127.0.0.1", backup_port),
                                   script_ae: (script_ae, "127.0.0.1", 1),
                                   **(extra_rv_modalities or {})})
    backup = OrthancServer(tgt["aet"], workdir=workdir / "backup", dicom_port=backup_port,
                           dicom_threads=dicom_threads,
                           lua_scripts=backup_lua or [],
                           modalities={src["aet"]: (src["aet"], "127.0.0.1", rv.dicom_port),
                                       script_ae: (script_ae, "127.0.0.1", 1),
                                       **(extra_backup_modalities or {})})
    rv.start()
    try:
        backup.start()
    except Exception:
        rv.remove()
        raise
    src.update(port=rv.dicom_port, max_find_results=rv_find_cap)
    tgt.update(port=backup.dicom_port, rest_url=backup.url, username=backup.username)
    demo["settings"] = {**demo.get("settings", {}), "state_dir": str(workdir / "state"),
                        **(settings or {})}
    if schedules:
        demo["schedules"] = {**demo.get("schedules", {}), **schedules}
    config_path = workdir / "environments.toml"
    config_path.write_text("# Written by demo.site for this run.\n" + dump_toml(data))
    os.environ[tgt["password_env"]] = backup.password
    return DemoSite(rv, backup, config_path, workdir)


def pydicom_rt_samples() -> list[Path]:
    """The real RT sample files pydicom ships (plan, structure set, dose, a CT slice)."""
    return [Path(p) for p in (get_testdata_file(n) for n in PYDICOM_RT_SAMPLES) if p]


def add_restore_target(site: DemoSite, alias: str, server: OrthancServer,
                       associations: int = 1) -> None:
    """Declare ``server`` (an Orthanc, its REST API as the backup's password) as a restore
    target of site DEMO that takes ``associations`` at once."""
    config = Path(site.config_path)
    config.write_text(config.read_text() + f"""
[DEMO.restore_targets.{alias}]
type = "orthanc"
aet = "{server.aet}"
ip = "127.0.0.1"
port = {server.dicom_port}
rest_url = "{server.url}"
username = "{server.username}"
password_env = "RADONC_DEMO_BACKUP_PASSWORD"
max_associations = {associations}
""")
