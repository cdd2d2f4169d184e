"""Errors that say where things went wrong, and whether trying again can help.

Every error names the site, the peer (AE title and host:port) and, where there is one, the object
(a UID, never a patient name). ``RetriableError`` heals with time (peer down, association aborted,
out of resources, timeouts); everything else is fatal and is not retried.
"""

from __future__ import annotations


class BackupError(Exception):
    """Base class: a message that a medical physicist can act on."""


class ConfigError(BackupError):
    """The site configuration is wrong or incomplete (file, site and key are in the message)."""


class SecretMissing(ConfigError):
    """A secret named in the config is not set for this site."""


class DicomError(BackupError):
    """A DICOM operation with a peer failed."""

    def __init__(self, site: str, peer: str, operation: str, detail: str,
                 uid: str | None = None, calling_ae: str = "") -> None:
        self.site = site
        self.calling_ae = calling_ae
        self.peer = peer
        self.operation = operation
        self.detail = detail
        self.uid = uid
        about = f" for {uid}" if uid else ""
        who = f"from {calling_ae} to" if calling_ae else "with"
        super().__init__(f"site {site}: {operation} {who} {peer}{about} failed: {detail}")


class RetriableDicomError(DicomError):
    """Transient: the peer is down, busy, aborted, or timed out. Retrying may succeed."""


class FatalDicomError(DicomError):
    """Permanent: the peer rejects our AE, the identifier, or the destination. Fix the setup."""

    refused_identifier = False  # the peer refused one identifier; the association went on
    status: int | None = None


class FindTruncated(DicomError):
    """The peer stopped its C-FIND answer at its result limit: the window must be split."""


class BackupTargetError(BackupError):
    """The backup PACS could not be asked what it holds."""


class RetriableBackupTargetError(BackupTargetError):
    """The backup PACS is down or timed out."""


class BackupIncomplete(BackupError):
    """A run ended with instances that are not verified in the backup."""


def is_retriable(exc: BaseException) -> bool:
    return isinstance(exc, (RetriableDicomError, RetriableBackupTargetError))
