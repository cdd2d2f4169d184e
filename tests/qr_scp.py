"""An in-process Q/R SCP shaped like a vendor's conformance statement, not like Orthanc.

Real R&V servers differ from Orthanc in ways that once lost or mixed up data: some take one
SOP Instance UID per retrieve, some refuse single objects. This SCP answers Study Root C-FIND
(relational unless told otherwise, on the keys the backup asks) and performs C-MOVE
sub-operations itself, C-STOREing to the destination AE (C-GET ones back on the association).
``single_uid`` refuses (0xA900) a C-MOVE or C-GET listing several UIDs; ``refuse`` answers
0xC000 for the UIDs it holds but will not send; ``ignore_keys`` answers every C-FIND with
everything it holds; ``returns`` limits the keys its answers carry (DCMTK's dcmqrscp, for one,
returns only the keys of its index); ``cap`` stops an answer after that many matches without
saying so (``cut_status``: ending such an answer with 0xFE00); ``blank_uids``: answers for
these objects carry an empty SOP Instance UID; ``hierarchical_only`` refuses
relational queries; ``get_only`` offers C-GET and no C-MOVE. Runs on a free loopback port; the
UIDs of each retrieve request it received are kept in ``moves``, the level of each C-FIND in
``finds``; the most associations it had open at once in ``peak_associations``, the most
retrieves of image objects (CT, MR, PT) under way at once in ``peak_image_retrieves``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, \
    StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove, \
    Verification

from demo.orthanc import free_port
from demo.synthetic import to_bytes

_KEYS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
         "TreatmentDate", "TreatmentTime", "Modality", "StudyDate", "StudyTime")


def _values(value: object) -> list[str]:
    if value in (None, ""):
        return []
    if isinstance(value, str):
        return [v for v in value.split("\\") if v]
    return [str(v) for v in value]  # type: ignore[attr-defined]


def _matches(ds: Dataset, query: Dataset) -> bool:
    for key in _KEYS:
        wanted = query.get(key)
        if key not in query or wanted in (None, ""):
            continue
        have = str(ds.get(key, "") or "")
        if key in ("TreatmentDate", "TreatmentTime", "StudyDate", "StudyTime") and \
                "-" in str(wanted):
            lo, _, hi = str(wanted).partition("-")
            value = have.split(".")[0]
            if not value or (lo and value < lo.split(".")[0]) or (hi and value > hi.split(".")[0]):
                return False  # seconds against seconds: an upper bound of .999999 is inclusive
        elif have not in _values(wanted):
            return False
    return True


class StrictQRSCP:
    def __init__(self, aet: str, objects: list[Dataset], destinations: dict[str, tuple[str, int]],
                 single_uid: bool = False, refuse: set[str] | None = None,
                 ignore_keys: bool = False, returns: set[str] | None = None,
                 cap: int = 0, hierarchical_only: bool = False, get_only: bool = False,
                 cut_status: bool = False, blank_uids: set[str] | None = None) -> None:
        for ds in objects:
            to_bytes(ds)  # gives each a file meta (the transfer syntax its C-STORE uses)
        self.aet, self.objects, self.destinations = aet, objects, destinations
        self.single_uid, self.refuse = single_uid, refuse or set()
        self.ignore_keys = ignore_keys  # C-FIND answers every object it holds, like a peer
        # that matches only the keys it indexes
        self.returns = returns  # the keys it can return (None: every key asked)
        self.cap = cap  # stops answering after this many matches, with a Success status
        self.cut_status = cut_status  # ... or, when more matched, with Cancel (0xFE00), as
        # Orthanc and peers that say they cut do
        # refuses a query below STUDY level that does not name its one parent study (and, at
        # IMAGE level, series), as a hierarchical-only SCP does
        self.hierarchical_only = hierarchical_only
        self.blank_uids = blank_uids or set()  # answered with an empty SOPInstanceUID
        self.port = free_port()
        self.moves: list[list[str]] = []
        self.finds: list[str] = []  # the level of each C-FIND received
        self.refused_finds = 0
        self._lock = threading.Lock()
        self._open = self._image_retrieves = 0
        self.peak_associations = self.peak_image_retrieves = 0
        self.ae = AE(ae_title=aet)
        self.ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        if not get_only:  # a C-GET-only peer (MIM-like) has no C-MOVE service
            self.ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        self.ae.add_supported_context(Verification)
        self.ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        for cx in StoragePresentationContexts:  # C-GET sends back on the same association
            self.ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES,
                                          scu_role=True, scp_role=True)
        self.ae.requested_contexts = StoragePresentationContexts
        self.server = None

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        level = str(query.get("QueryRetrieveLevel", "IMAGE"))
        parents = {"SERIES": ["StudyInstanceUID"],
                   "IMAGE": ["StudyInstanceUID", "SeriesInstanceUID"]}.get(level, [])
        self.finds.append(level)
        if self.hierarchical_only and any(len(_values(query.get(k))) != 1 for k in parents):
            self.refused_finds += 1
            yield 0xA900, None  # Identifier does not match SOP Class
            return
        seen: set[str] = set()
        sent = 0
        unique = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID"}.get(level)
        for ds in self.objects:
            matches = (self.ignore_keys or _matches(ds, query)) and \
                not (unique and ds.get(unique) in seen)
            if self.cap and sent == self.cap:
                if self.cut_status and matches:
                    yield 0xFE00, None  # more matched than it sends: it says so
                    return
                if not self.cut_status:
                    break
                continue
            if matches:
                if unique:  # one answer per study or series
                    seen.add(ds.get(unique))
                sent += 1
                answer = Dataset()
                for key in query.dir():
                    if key != "QueryRetrieveLevel" and (self.returns is None or
                                                        key in self.returns):
                        setattr(answer, key, ds.get(key, ""))
                answer.QueryRetrieveLevel = level
                if str(ds.SOPInstanceUID) in self.blank_uids and "SOPInstanceUID" in answer:
                    answer.SOPInstanceUID = ""
                yield 0xFF00, answer
        yield 0x0000, None

    def _refusal(self, uids: list[str]) -> int | None:
        if self.single_uid and len(uids) > 1:
            return 0xA900  # Identifier does not match SOP Class: one UID per request
        if any(u in self.refuse for u in uids):
            return 0xC000  # Unable to process
        return None

    def _on_get(self, event: evt.Event) -> Iterator[object]:
        yield from self._sub_operations(event.identifier)

    def _on_move(self, event: evt.Event) -> Iterator[object]:
        destination = event.move_destination
        if isinstance(destination, bytes):
            destination = destination.decode("ascii")
        yield self.destinations.get(destination.strip(), (None, None))
        yield from self._sub_operations(event.identifier)

    def _sub_operations(self, query: Dataset) -> Iterator[object]:
        """What a retrieve yields after its destination: a count, then the objects."""
        uids = _values(query.get("SOPInstanceUID"))
        self.moves.append(uids)
        refusal = self._refusal(uids)
        if refusal is not None:
            yield 1
            yield refusal, None
            return
        found = [ds for ds in self.objects if _matches(ds, query)]
        images = any(str(ds.get("Modality", "")) in ("CT", "MR", "PT") for ds in found)
        if images:
            self._count("_image_retrieves", "peak_image_retrieves", +1)
        try:
            yield len(found)
            for ds in found:
                yield 0xFF00, ds
        finally:
            if images:
                self._count("_image_retrieves", "peak_image_retrieves", -1)

    def _count(self, now: str, peak: str, step: int) -> None:
        with self._lock:
            setattr(self, now, getattr(self, now) + step)
            setattr(self, peak, max(getattr(self, peak), getattr(self, now)))

    def __enter__(self) -> "StrictQRSCP":
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_FIND, self._on_find), (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_CONN_OPEN, lambda _: self._count("_open", "peak_associations", +1)),
            (evt.EVT_CONN_CLOSE, lambda _: self._count("_open", "peak_associations", -1))])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.shutdown()


def add_source(site: object, server: StrictQRSCP, name: str = "strict", kind: str = "aria",
               **settings: object) -> None:
    """Name ``server`` as a source of the demo site, of type ``kind`` (and create its R&V
    limit)."""
    from pathlib import Path

    from radonc_backup.config import load_site
    from tasks.limits import ensure_rv_limits

    cfg = Path(site.config_path)  # type: ignore[attr-defined]
    extra = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in settings.items())
    cfg.write_text(cfg.read_text() + f'\n[DEMO.sources.{name}]\ntype = "{kind}"\n'
                                     f'aet = "{server.aet}"\nip = "127.0.0.1"\n'
                                     f'port = {server.port}\n{extra}')
    ensure_rv_limits(load_site("DEMO", str(cfg)))
