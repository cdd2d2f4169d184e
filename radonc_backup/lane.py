"""Opening a lane: a site's source, its backup target and the ledger, from plain parameters.

Tasks and flows receive only strings (site, aliases, config path) so they hash, serialise and
show cleanly in the Prefect UI; each opens what it needs here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .backup_target import DicomScpBackup, OrthancBackup, open_backup
from .config import AriaSource, MimSource, Site, load_site
from .dicom_net import DicomClient
from .ledger import Lane, Ledger
from .rt_backup import dicom_source


@dataclass
class OpenLane:
    site: Site
    source_alias: str
    source: AriaSource | MimSource
    target: OrthancBackup | DicomScpBackup
    ledger: Ledger
    lane: Lane

    def store_client(self) -> DicomClient:
        """A C-STORE client to the backup's DICOM port (used to relay C-GET results)."""
        return self.site.client(self.site.backup(self.lane.backup)[1])


def open_lane(site: str, source: str | None = None, backup: str | None = None,
              config: str | None = None) -> OpenLane:
    cfg = load_site(site, config)
    source_alias, src = dicom_source(cfg, source)
    target = open_backup(cfg, backup)
    ledger = Ledger.for_state_dir(cfg.state_dir)
    return OpenLane(cfg, source_alias, src, target, ledger,
                    Lane(cfg.name, source_alias, target.alias))
