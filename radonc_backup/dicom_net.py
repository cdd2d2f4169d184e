"""The one DICOM network layer: C-ECHO, C-FIND, C-MOVE, C-GET and C-STORE over pynetdicom.

Why a layer of our own:
- every association proposes the RT storage classes (pynetdicom's defaults miss several);
- every socket sets TCP_NODELAY (on loopback and LANs, objects otherwise wait ~40 ms each on a
  delayed ACK);
- every failure becomes a ``RetriableDicomError`` or a ``FatalDicomError`` that names the site, the
  peer and the object, so retries happen only where they can help;
- a C-MOVE result carries its sub-operation counts and failed UIDs, but callers must still check
  the backup: a move status is not proof of arrival.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    HTJ2K,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, build_role, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom import sop_class as sop
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.status import code_to_category
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import AddressInformation, AssociationSocket

from .errors import DicomError, FatalDicomError, FindTruncated, RetriableDicomError

# pynetdicom's own event logging formats every DIMSE message, and every identifier of every
# C-FIND and C-MOVE answer (patient names among them), whether or not a handler shows the line:
# most of this process's CPU over a long listing (measured: docs/performance.md). The backup
# logs what it does itself; ``python -m radonc_backup.dicom_tools -v`` turns pynetdicom's back on.
pynetdicom_config.LOG_HANDLER_LEVEL = "none"
pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False

@contextmanager
def dimse_log(stream: IO[str], verbose: int) -> Iterator[None]:
    """With ``verbose`` 1, pynetdicom's account of each association and message goes to
    ``stream`` while the block runs; 2, also every PDU and every identifier asked and answered
    (patient names included: for a terminal, never for a log file). 0 changes nothing."""
    if not verbose:
        yield
        return
    dimse = logging.getLogger("pynetdicom")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved = (dimse.level, pynetdicom_config.LOG_HANDLER_LEVEL,
             pynetdicom_config.LOG_REQUEST_IDENTIFIERS, pynetdicom_config.LOG_RESPONSE_IDENTIFIERS)
    dimse.addHandler(handler)
    dimse.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    pynetdicom_config.LOG_HANDLER_LEVEL = "standard"
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = \
        verbose > 1
    try:
        yield
    finally:
        dimse.removeHandler(handler)
        (level, pynetdicom_config.LOG_HANDLER_LEVEL, pynetdicom_config.LOG_REQUEST_IDENTIFIERS,
         pynetdicom_config.LOG_RESPONSE_IDENTIFIERS) = saved
        dimse.setLevel(level)


RT_RECORD_CLASSES = {
    sop.RTBeamsTreatmentRecordStorage: "RT Beams Treatment Record",
    sop.RTBrachyTreatmentRecordStorage: "RT Brachy Treatment Record",
    sop.RTTreatmentSummaryRecordStorage: "RT Treatment Summary Record",
    sop.RTIonBeamsTreatmentRecordStorage: "RT Ion Beams Treatment Record",
}

STORAGE_CLASSES = [
    *RT_RECORD_CLASSES,
    *(getattr(sop, name) for name in (
        "RTImageStorage", "RTDoseStorage", "RTStructureSetStorage", "RTPlanStorage",
        "RTIonPlanStorage", "RTPhysicianIntentStorage", "RTSegmentAnnotationStorage",
        "CTImageStorage", "EnhancedCTImageStorage", "MRImageStorage", "EnhancedMRImageStorage",
        "PositronEmissionTomographyImageStorage", "EnhancedPETImageStorage",
        "SecondaryCaptureImageStorage", "RawDataStorage", "SpatialRegistrationStorage",
        "DeformableSpatialRegistrationStorage", "SegmentationStorage",
        "XRayAngiographicImageStorage",  # kV imaging
        "ComputedRadiographyImageStorage", "DigitalXRayImageStorageForPresentation")),
]

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEG2000Lossless,
    JPEG2000,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
]
"""Every syntax pydicom knows for the objects we move. Each is offered in a presentation context
of its own (``contexts_for``): a peer accepts one syntax per context, so a single context listing
them all would make it decompress, or fail, every object not in the syntax it picked."""


def contexts_for(sop_classes: Iterable[str], limit: int = 127) -> list[PresentationContext]:
    """One presentation context per (SOP class, transfer syntax), at most ``limit`` (an
    association carries 128 with the Q/R context). With more classes than fit, the classes
    past the limit get one context listing every syntax (they can still move uncompressed)."""
    classes = list(dict.fromkeys(sop_classes))
    per_syntax = max(0, min(len(classes), (limit - len(classes)) // (len(TRANSFER_SYNTAXES) - 1)))
    contexts = [build_context(c, ts) for c in classes[:per_syntax] for ts in TRANSFER_SYNTAXES]
    contexts += [build_context(c, TRANSFER_SYNTAXES) for c in classes[per_syntax:]]
    return contexts[:limit]

QUERY_MODELS = {
    "study": (StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelMove,
              StudyRootQueryRetrieveInformationModelGet),
    "patient": (PatientRootQueryRetrieveInformationModelFind,
                PatientRootQueryRetrieveInformationModelMove,
                PatientRootQueryRetrieveInformationModelGet),
}

_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised (register our AE on the peer)",
    (1, 7): "called AE title not recognised (check the peer's AE title)",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


class NoDelayAE(AE):
    """An AE whose association sockets send small PDUs at once (TCP_NODELAY)."""

    def _create_socket(self, assoc: Association, address: AddressInformation,
                       tls_args: object) -> AssociationSocket:
        sock = super()._create_socket(assoc, address, tls_args)  # type: ignore[arg-type]
        if sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


@dataclass(frozen=True)
class Peer:
    aet: str
    host: str
    port: int

    @property
    def label(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Timeouts:
    acse: float = 30.0
    dimse: float = 300.0
    network: float = 60.0
    connection: float = 10.0


@dataclass
class MoveResult:
    """The final C-MOVE response. Counts are what the peer claims, not what arrived."""

    status: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    error: str = ""  # the peer refused this identifier (the association went on)

    @property
    def claims_success(self) -> bool:
        return self.status == 0x0000 and self.failed == 0 and self.warning == 0


@dataclass
class StoreResult:
    sop_instance_uid: str
    status: int | None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and code_to_category(self.status) in ("Success",
                                                                            "Warning")


def identifier(level: str, **keys: object) -> Dataset:
    """A Q/R identifier: the level and its keys (an empty value asks the peer to return it)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def uid_list(value: object) -> list[str]:
    """The UIDs of a UI value that may hold one or several."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v for v in value.split("\\") if v]
    return [str(v) for v in value]  # type: ignore[attr-defined]


def _sub_operations(status: int, status_ds: Dataset) -> MoveResult:
    return MoveResult(
        status=status,
        completed=int(status_ds.get("NumberOfCompletedSuboperations", 0) or 0),
        failed=int(status_ds.get("NumberOfFailedSuboperations", 0) or 0),
        warning=int(status_ds.get("NumberOfWarningSuboperations", 0) or 0),
    )


def _status(value: Dataset) -> int | None:
    return int(value.Status) if value is not None and "Status" in value else None


class DicomClient:
    """Talks to one peer as ``calling_ae``; every method opens and releases its own association."""

    def __init__(self, site: str, calling_ae: str, peer: Peer, timeouts: Timeouts = Timeouts(),
                 query_model: str = "study", gate: threading.Semaphore | None = None) -> None:
        self.site = site
        # Shared by the clients of concurrent work that must stay within a number of
        # associations (plan-context walks): each association holds a permit while it is open.
        self.gate = gate
        self.calling_ae = calling_ae
        self.peer = peer
        self.timeouts = timeouts
        self.find_model, self.move_model, self.get_model = QUERY_MODELS[query_model]

    def _error(self, retriable: bool, operation: str, detail: str,
               uid: str | None = None) -> DicomError:
        cls = RetriableDicomError if retriable else FatalDicomError
        return cls(self.site, self.peer.label, operation, detail, uid, self.calling_ae)

    def _ae(self) -> NoDelayAE:
        ae = NoDelayAE(ae_title=self.calling_ae)
        ae.acse_timeout = self.timeouts.acse
        ae.dimse_timeout = self.timeouts.dimse
        ae.network_timeout = self.timeouts.network
        ae.connection_timeout = self.timeouts.connection
        ae.maximum_pdu_size = 131072
        return ae

    @contextmanager
    def association(self, operation: str, contexts: list[PresentationContext],
                    roles: list[object] | None = None,
                    handlers: list[tuple[object, Callable[..., object]]] | None = None,
                    ) -> Iterator[Association]:
        with self.gate or nullcontext(), \
                self._association(operation, contexts, roles, handlers) as assoc:
            yield assoc

    @contextmanager
    def _association(self, operation: str, contexts: list[PresentationContext],
                     roles: list[object] | None,
                     handlers: list[tuple[object, Callable[..., object]]] | None,
                     ) -> Iterator[Association]:
        ae = self._ae()
        connected: list[bool] = []
        on_open = (evt.EVT_CONN_OPEN, lambda event: connected.append(True))

        def request() -> Association:
            return ae.associate(self.peer.host, self.peer.port, contexts=contexts,
                                ae_title=self.peer.aet, ext_neg=roles or None,
                                evt_handlers=[*(handlers or []), on_open])

        assoc = request()
        if connected and assoc.is_aborted:
            # Orthanc sometimes closes its socket so fast after rejecting our AE that pynetdicom
            # sees an abort (1 request in 60 here); asking once more tells a rejection, which
            # must not be retried, from a real abort.
            assoc = request()
        if assoc.is_rejected:
            prim = assoc.acceptor.primitive
            result, source, diag = (prim.result, prim.result_source, prim.diagnostic) if prim else (
                1, 1, 1)
            reason = _REJECT_REASONS.get((source, diag), f"source {source}, reason {diag}")
            transient = result == 2
            raise self._error(transient, operation,
                              f"association rejected ({'transient' if transient else 'permanent'}"
                              f"): {reason}; our AE is {self.calling_ae}")
        if not connected:
            raise self._error(True, operation, "peer down or unreachable: no TCP connection "
                                               "(refused or timed out)")
        if assoc.is_aborted:
            raise self._error(True, operation, "association aborted by the peer (if it persists, "
                                               "check that the peer knows our AE title)")
        if not assoc.is_established:
            raise self._error(True, operation, "no association: peer down, unreachable or not "
                                               "answering within the timeouts")
        try:
            yield assoc
        except BaseException:
            assoc.abort()
            raise
        else:
            if assoc.is_established:
                assoc.release()
        finally:
            ae.shutdown()

    def _refused(self, operation: str, status: int, detail: str,
                 about: str | None) -> FatalDicomError:
        """The peer refused one identifier; the association is still up for the next."""
        exc = FatalDicomError(self.site, self.peer.label, operation, detail, about or None,
                              self.calling_ae)
        exc.refused_identifier, exc.status = True, status
        return exc

    def _accepted(self, assoc: Association, operation: str, abstract_syntax: str) -> None:
        if not any(cx.abstract_syntax == abstract_syntax for cx in assoc.accepted_contexts):
            raise self._error(False, operation, f"peer accepted no presentation context for "
                                                f"{abstract_syntax}")

    def echo(self) -> int:
        with self.association("C-ECHO", [build_context(Verification)]) as assoc:
            status = _status(assoc.send_c_echo())
            if status is None:
                raise self._error(True, "C-ECHO", "no response (timeout or abort)")
            return status

    def find(self, identifier: Dataset) -> Iterator[Dataset]:
        """Stream C-FIND matches. An empty result is only returned after a Success status."""
        with self.association("C-FIND", [build_context(self.find_model)]) as assoc:
            self._accepted(assoc, "C-FIND", self.find_model)
            for status_ds, match in assoc.send_c_find(identifier, self.find_model):
                status = _status(status_ds)
                if status is None:
                    raise self._error(True, "C-FIND", "no response (timeout or association "
                                                      "aborted) before the final status")
                if self._pending("C-FIND", status, status_ds):
                    if match is not None:
                        yield match
                    continue
                return
            raise self._error(True, "C-FIND", "association ended before a final status")

    def move(self, identifiers: Iterable[Dataset], destination: str) -> list[MoveResult]:
        """One C-MOVE request per identifier, all on one association, one result each.

        A peer that refuses one identifier (0xA9xx, or a failure before sending anything) fails
        that identifier alone: its result carries the error and the next identifier is asked on
        the same association. An unknown destination, a busy peer or a lost association stop
        the call (they would fail every identifier alike)."""
        results = []
        with self.association("C-MOVE", [build_context(self.move_model)]) as assoc:
            self._accepted(assoc, "C-MOVE", self.move_model)
            for identifier in identifiers:
                try:
                    results.append(self._move_one(assoc, identifier, destination))
                except FatalDicomError as exc:
                    if exc.refused_identifier and assoc.is_established:
                        results.append(MoveResult(status=exc.status or 0xC000, error=str(exc)))
                        continue
                    raise
        return results

    def _move_one(self, assoc: Association, identifier: Dataset, destination: str) -> MoveResult:
        last: MoveResult | None = None
        about = str(identifier.get("SeriesInstanceUID", "") or identifier.get("StudyInstanceUID",
                                                                                  ""))
        for status_ds, ident in assoc.send_c_move(identifier, destination, self.move_model):
            status = _status(status_ds)
            if status is None:
                raise self._error(True, "C-MOVE", "no response (timeout or association aborted)",
                                  about or None)
            last = _sub_operations(status, status_ds)
            if ident is not None and "FailedSOPInstanceUIDList" in ident:
                last.failed_uids = uid_list(ident.FailedSOPInstanceUIDList)
            if self._pending("C-MOVE", status, status_ds, about, last, destination):
                continue
            return last
        if last is None:
            raise self._error(True, "C-MOVE", "no response", about or None)
        return last

    def get(self, identifier: Dataset, on_instance: Callable[[Dataset], None],
            sop_classes: Iterable[str] = ()) -> MoveResult:
        """C-GET: the peer sends the objects back on this association to ``on_instance``.

        ``sop_classes``: the classes expected (from the C-FIND), each offered in every transfer
        syntax in a context of its own, so compressed objects come in their own syntax; unknown,
        every storage class is offered."""

        def keep(event: evt.Event) -> None:
            ds = event.dataset
            ds.file_meta = event.file_meta
            on_instance(ds)

        return self._get(identifier, keep, sop_classes)

    def get_to_folder(self, identifier: Dataset, folder: Path, sop_classes: Iterable[str] = (),
                      ) -> tuple[MoveResult, list[Path]]:
        """C-GET with each object written to ``folder`` as it arrives, as the peer encoded it
        (never decoded): memory holds one object at a time, whatever the size of the series.
        Returns the result and the files, in the order they came."""
        files: list[Path] = []

        def spool(event: evt.Event) -> None:
            path = folder / f"{len(files):06d}.dcm"
            path.write_bytes(event.encoded_dataset(include_meta=True))
            files.append(path)

        return self._get(identifier, spool, sop_classes), files

    def _get(self, identifier: Dataset, on_store: Callable[[evt.Event], None],
             sop_classes: Iterable[str]) -> MoveResult:
        def handle_store(event: evt.Event) -> int:
            try:
                on_store(event)
            except Exception:
                return 0xA700
            return 0x0000

        about = str(identifier.get("SeriesInstanceUID", "") or identifier.get("StudyInstanceUID",
                                                                                "")) or None
        classes = [c for c in sop_classes if c] or STORAGE_CLASSES
        contexts = [build_context(self.get_model), *contexts_for(classes)]
        roles = [build_role(uid, scp_role=True) for uid in dict.fromkeys(classes)]
        last = MoveResult(status=0xC000)
        with self.association("C-GET", contexts, roles,
                              [(evt.EVT_C_STORE, handle_store)]) as assoc:
            self._accepted(assoc, "C-GET", self.get_model)
            for status_ds, ident in assoc.send_c_get(identifier, self.get_model):
                status = _status(status_ds)
                if status is None:
                    raise self._error(True, "C-GET", "no response (timeout or association "
                                                     "aborted)")
                last = _sub_operations(status, status_ds)
                self._pending("C-GET", status, status_ds, about, last)
        return last

    def store_files(self, files: Iterable[Path], remove: bool = False) -> list[StoreResult]:
        """C-STORE DICOM files on one association, read one at a time (``remove``: each file
        deleted once sent); a refused object is reported, not raised. The contexts come from
        the files' meta headers, so each object goes in the syntax it is stored in."""
        paths = list(files)
        metas = {p: read_file_meta_info(p) for p in paths}
        return self._store_each(
            [(str(metas[p].MediaStorageSOPInstanceUID), str(metas[p].MediaStorageSOPClassUID),
              str(metas[p].TransferSyntaxUID), p) for p in paths],
            (lambda p: p.unlink(missing_ok=True)) if remove else None)  # type: ignore

    def store(self, datasets: Iterable[Dataset]) -> list[StoreResult]:
        """C-STORE each dataset on one association; a refused object is reported, not raised."""
        return self._store_each([
            (str(ds.SOPInstanceUID), str(ds.SOPClassUID),
             str(ds.file_meta.TransferSyntaxUID) if "file_meta" in ds.__dict__
             and "TransferSyntaxUID" in ds.file_meta else ExplicitVRLittleEndian, ds)
            for ds in datasets])

    def _store_each(self, items: list[tuple[str, str, str, Dataset | Path]],
                    sent: Callable[[Dataset | Path], None] | None = None) -> list[StoreResult]:
        """(UID, class, syntax, dataset or file) each C-STOREd in turn on one association,
        with one context per (class, syntax) they are in: each goes as it came, unchanged."""
        if not items:
            return []
        pairs = sorted({(cls, ts) for _, cls, ts, _ in items})
        results = []
        with self.association("C-STORE", [build_context(c, ts) for c, ts in pairs][:128]) \
                as assoc:
            for uid, _, _, obj in items:
                try:
                    status = _status(assoc.send_c_store(obj))
                except ValueError as exc:  # no accepted context for this class/transfer syntax
                    results.append(StoreResult(uid, None, str(exc)))
                    continue
                if status is None:
                    raise self._error(True, "C-STORE", "no response (timeout or abort)", uid)
                result = StoreResult(uid, status)
                if not result.ok:
                    result.error = f"status 0x{status:04X} ({code_to_category(status)})"
                results.append(result)
                if sent is not None:
                    sent(obj)
        return results

    def _pending(self, operation: str, status: int, status_ds: Dataset,
                 about: str | None = None, sent: MoveResult | None = None,
                 destination: str = "") -> bool:
        """The one reading of a C-FIND/C-MOVE/C-GET response status, by the standard's category
        (pynetdicom's ``code_to_category``): True while Pending, False when final and usable,
        else the error for that category raised.

        - Success, Warning: final (a retrieve's failed sub-operations are in its counts, and
          the backup is checked anyway);
        - Cancel (0xFE00): a C-FIND answer cut short (``FindTruncated``: the window is split);
          a retrieve cancelled is final, what arrived is what the backup holds;
        - Failure 0xA7xx, out of resources: retriable;
        - Failure 0xA801, move destination unknown: fatal, names the destination;
        - Failure 0xA9xx (identifier does not match the SOP class), or a retrieve failing
          before it sent anything: this identifier refused, the association goes on;
        - any other Failure: fatal for a C-FIND; final for a retrieve that sent something;
        - a code the standard does not define: fatal, never taken for success.
        """
        category = code_to_category(status)
        comment = str(status_ds.get("ErrorComment", "") or "") if status_ds else ""
        detail = f"0x{status:04X}{': ' + comment if comment else ''}"
        if category == "Pending":
            return True
        if category in ("Success", "Warning"):
            return False
        if category == "Cancel":
            if operation == "C-FIND":
                raise FindTruncated(self.site, self.peer.label, operation,
                                    f"answer cut short by the peer (status {detail})",
                                    calling_ae=self.calling_ae)
            return False
        if category != "Failure":
            raise self._error(False, operation, f"status {detail} is not a DICOM status: the "
                                                "answer cannot be trusted", about)
        if status >> 8 == 0xA7:
            raise self._error(True, operation, f"peer out of resources ({detail})", about)
        if operation == "C-MOVE" and status == 0xA801:
            raise self._error(False, operation, f"move destination {destination} is unknown to "
                                                "the peer: register it there", about)
        if operation == "C-FIND" or sent is None:
            raise self._error(False, operation, f"request refused ({detail})", about)
        if status >> 8 == 0xA9:
            raise self._refused(operation, status, f"identifier rejected ({detail})", about)
        if sent.completed + sent.warning + (sent.failed if operation == "C-MOVE" else 0) == 0:
            where = (f"the objects are not there, or {destination} is not registered there as "
                     "a move destination" if operation == "C-MOVE" else
                     f"{sent.failed} failed")
            raise self._refused(operation, status, f"the peer failed the retrieve ({detail}) "
                                                   f"before sending anything: {where}", about)
        return False
