"""Asking the backup what it really holds.

A C-MOVE or C-STORE status is not proof of arrival, so an instance is verified only when the
backup itself lists it. Orthanc is asked over REST (``/tools/find`` with a list of SOP Instance
UIDs, a few hundred per request); any other DICOM SCP by C-FIND at IMAGE level, one query per
series with the UIDs as a list.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset

from .config import DicomScpTarget, OrthancTarget, Site, resolve_secret
from .dicom_net import identifier
from .errors import BackupTargetError, RetriableBackupTargetError
from .instance import InstanceRef

_FIND_CHUNK = 200


class BackupTarget(Protocol):
    alias: str
    aet: str
    confirms_on_receipt: bool
    """True when the backup has stored and indexed an object before it acknowledges the C-STORE
    (Orthanc): once a move's final response is in, what is absent is absent."""

    def present(self, refs: Iterable[InstanceRef]) -> set[str]:
        """SOP Instance UIDs among ``refs`` that the backup holds now."""
        ...

    def series_instances(self, patient_id: str, study_uid: str, series_uid: str) -> set[str]:
        """SOP Instance UIDs the backup holds in one series."""
        ...

    def read(self, sop_instance_uid: str) -> Dataset | None:
        """The backup's copy of an instance (without pixel data), or None if absent."""
        ...

    def holds_rt_records(self) -> bool:
        """Whether the backup holds any RT Record at all."""
        ...


def orthanc_id(*uids: str) -> str:
    """Orthanc's resource ID: SHA-1 of PatientID|StudyUID[|SeriesUID[|SOPInstanceUID]]."""
    digest = hashlib.sha1("|".join(uids).encode()).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


class OrthancBackup:
    confirms_on_receipt = True  # Orthanc indexes an instance before its C-STORE response

    def __init__(self, site: Site, alias: str, target: OrthancTarget) -> None:
        self.site = site.name
        self.alias = alias
        self.aet = target.aet
        self.url = target.rest_url.rstrip("/")
        password = resolve_secret(site, f"backup target {alias} ({target.aet})",
                                  target.password_env, target.password_secret)
        self._auth = (target.username, password) if password is not None else None
        self._timeout = site.settings.network_timeout
        self._http: httpx.Client | None = None

    @property
    def _where(self) -> str:
        return f"site {self.site}: backup {self.alias} ({self.aet}, {self.url})"

    def __getstate__(self) -> dict[str, object]:
        """Picklable for worker processes: everything but the open HTTP connection."""
        return {**self.__dict__, "_http": None}

    @property
    def identity(self) -> tuple[object, ...]:
        """What makes two instances talk to the same backup the same way."""
        return (self.site, self.alias, self.aet, self.url, self._auth, self._timeout)

    def _client(self) -> httpx.Client:
        """One keep-alive HTTP client per target (creating one costs ~50 ms)."""
        if self._http is None:
            # Loading CA certificates costs ~40 ms and is needed only for https. An idle
            # connection is dropped after 0.4 s: Orthanc's HTTP server (CivetWeb) closes one
            # after 0.5 s, and reusing it just then failed a request under load ("Server
            # disconnected without sending a response").
            self._http = httpx.Client(base_url=self.url, auth=self._auth, timeout=self._timeout,
                                      verify=self.url.startswith("https"),
                                      limits=httpx.Limits(keepalive_expiry=0.4))
        return self._http

    def connect(self) -> None:
        """Open the keep-alive client now, before threads share it (httpx's client is
        thread-safe; its lazy creation here is not)."""
        self._client()

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def _get(self, path: str) -> httpx.Response:
        """GET; an unreachable backup is retriable, the status is the caller's to judge."""
        try:
            return self._client().get(path)
        except httpx.TransportError as exc:
            raise RetriableBackupTargetError(f"{self._where}: not reachable: {exc}") from None

    def _post(self, path: str, body: object) -> object:
        try:
            r = self._client().post(path, json=body)
        except httpx.TransportError as exc:
            raise RetriableBackupTargetError(f"{self._where}: not reachable: {exc}") from None
        return self._json(r, path)

    def _json(self, r: httpx.Response, path: str) -> object:
        if r.status_code == 401:
            raise BackupTargetError(f"{self._where}: REST authentication failed for user "
                                    f"{self._auth[0] if self._auth else '(none)'}")
        if r.status_code >= 500:
            raise RetriableBackupTargetError(f"{self._where}: {path} answered {r.status_code}")
        if r.status_code >= 400:
            raise BackupTargetError(f"{self._where}: {path} answered {r.status_code}: "
                                    f"{r.text[:200]}")
        return r.json()

    def version(self) -> str:
        """Orthanc's version: proves the REST API answers and accepts our login."""
        system = self._json(self._get("/system"), "/system")
        return str(system.get("Version", "?")) if isinstance(system, dict) else "?"

    def present(self, refs: Iterable[InstanceRef]) -> set[str]:
        """Fast path: each series' instance list, matched on Orthanc's deterministic IDs.
        Whatever that does not find is asked for by UID, so a mismatch can only cost time."""
        refs = list(refs)
        found = self._present_by_series(refs)
        rest = [r for r in refs if r.sop_instance_uid not in found]
        return found | self._present_by_uid(rest) if rest else found

    def _present_by_series(self, refs: list[InstanceRef]) -> set[str]:
        by_series: dict[str, dict[str, str]] = defaultdict(dict)
        for r in refs:
            if r.patient_id and r.study_uid and r.series_uid:
                by_series[orthanc_id(r.patient_id, r.study_uid, r.series_uid)][
                    orthanc_id(r.patient_id, r.study_uid, r.series_uid, r.sop_instance_uid)] = \
                    r.sop_instance_uid
        found: set[str] = set()
        for series_id, expected in by_series.items():
            r = self._get(f"/series/{series_id}")
            if r.status_code == 200:
                held = set(r.json().get("Instances", []))
                found |= {uid for oid, uid in expected.items() if oid in held}
        return found

    def present_by_uid(self, refs: list[InstanceRef]) -> set[str]:
        """Asked by each instance's own UID only (what the sweep does before calling one
        missing)."""
        return self._present_by_uid(refs)

    def _present_by_uid(self, refs: list[InstanceRef]) -> set[str]:
        uids = sorted({r.sop_instance_uid for r in refs})
        found: set[str] = set()
        for i in range(0, len(uids), _FIND_CHUNK):
            chunk = uids[i:i + _FIND_CHUNK]
            answer = self._post("/tools/find", {
                "Level": "Instance", "Expand": True,
                "Query": {"SOPInstanceUID": "\\".join(chunk)},
            })
            for item in answer:  # type: ignore[union-attr]
                uid = item.get("MainDicomTags", {}).get("SOPInstanceUID")
                if uid:
                    found.add(uid)
        return found & set(uids)

    def series_instances(self, patient_id: str, study_uid: str, series_uid: str) -> set[str]:
        answer = self._post("/tools/find", {"Level": "Instance", "Expand": True,
                                            "Query": {"SeriesInstanceUID": series_uid}})
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in answer  # type: ignore[union-attr]
                if i.get("MainDicomTags", {}).get("SOPInstanceUID")}

    def read(self, sop_instance_uid: str) -> Dataset | None:
        ids = self._post("/tools/find", {"Level": "Instance",
                                         "Query": {"SOPInstanceUID": sop_instance_uid}})
        return self.read_resource(ids[0], sop_instance_uid) if ids else None  # type: ignore[index]

    def fetch_file(self, resource_id: str, about: str = "") -> bytes:
        """One instance's file by its Orthanc ID."""
        r = self._get(f"/instances/{resource_id}/file")
        if r.status_code != 200:
            raise BackupTargetError(f"{self._where}: reading {about or resource_id} answered "
                                    f"{r.status_code}")
        return r.content

    def stored_md5(self, resource_id: str) -> str:
        """The MD5 Orthanc recorded of an instance's file when it arrived ('' if it keeps
        none: StoreMD5 off)."""
        r = self._get(f"/instances/{resource_id}/attachments/dicom/md5")
        return r.text.strip().strip('"') if r.status_code == 200 else ""

    def fetch_verified(self, resource_id: str, about: str = "") -> bytes:
        """One instance's file, checked against the MD5 recorded when it arrived: a file
        changed or cut on disk is raised, never handed on (a copy, a pack, an export)."""
        data = self.fetch_file(resource_id, about)
        recorded = self.stored_md5(resource_id)
        if recorded and hashlib.md5(data).hexdigest() != recorded:
            raise BackupTargetError(f"{self._where}: {about or resource_id}: its stored file "
                                    "does not match the MD5 recorded when it arrived (changed "
                                    "or damaged on disk)")
        return data

    def read_resource(self, resource_id: str, about: str = "") -> Dataset:
        """One instance by its Orthanc ID, parsed without pixel data."""
        content = self.fetch_file(resource_id, about)
        try:
            return dcmread(io.BytesIO(content), stop_before_pixels=True)
        except Exception as exc:
            raise BackupTargetError(f"{self._where}: {about or resource_id} in the backup is not "
                                    f"readable DICOM: {exc}") from None

    def describe(self, resource_id: str) -> dict[str, str]:
        """SOPInstanceUID, PatientID and PatientName of an instance from Orthanc's index alone
        (for an instance whose file cannot be read); empty values where unknown."""
        found = {"SOPInstanceUID": "", "PatientID": "", "PatientName": ""}
        for path in (f"/instances/{resource_id}", f"/instances/{resource_id}/patient"):
            r = self._get(path)
            tags = r.json().get("MainDicomTags", {}) if r.status_code == 200 else {}
            found.update({k: str(v) for k, v in tags.items() if k in found})
        return found

    def holds_rt_records(self) -> bool:
        """Whether the backup holds any RT Record series at all (a ledger may have been lost)."""
        return bool(self._post("/tools/find", {"Level": "Series", "Limit": 1,  # type: ignore[arg-type]
                                               "Query": {"Modality": "RTRECORD"}}))

    def find_resources(self, query: dict[str, str]) -> list[str]:
        """Orthanc IDs of the instances matching a query on indexed tags."""
        return list(self._post("/tools/find",  # type: ignore[arg-type]
                               {"Level": "Instance", "Query": query}))

    def record_listing(self) -> dict[str, str]:
        """SOPInstanceUID -> Orthanc ID of every RT Record the backup holds (one listing)."""
        answer = self._post("/tools/find", {"Level": "Instance", "Expand": True,
                                            "Query": {"Modality": "RTRECORD"}})
        return {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"]  # type: ignore[index]
                for i in answer  # type: ignore[union-attr]
                if i.get("MainDicomTags", {}).get("SOPInstanceUID")}

    def damage(self, resource_id: str) -> str:
        """Why the stored file of an instance is not what was stored ('' when it is): Orthanc
        reads it back and checks the MD5 it kept when the instance arrived."""
        path = f"/instances/{resource_id}/attachments/dicom/verify-md5"
        try:
            r = self._client().post(path, content=b"")
        except httpx.HTTPError as exc:
            raise RetriableBackupTargetError(f"{self._where}: {path}: {exc}") from None
        if r.status_code == 200:
            return ""
        if r.status_code == 404:
            return "not in the backup"
        if r.status_code == 400:  # Orthanc 1.10: the file read back has another MD5
            return "its stored file fails Orthanc's MD5 check (changed or damaged on disk)"
        if r.status_code >= 500:  # e.g. the file is gone from the storage folder
            return f"its stored file cannot be read by Orthanc ({r.status_code}: " \
                   f"{' '.join(r.text.split())[:160]})"
        raise BackupTargetError(f"{self._where}: {path} answered {r.status_code}")

    def delete(self, resource_id: str) -> None:
        """Remove one instance (the sweep's repair, before storing a good copy again)."""
        try:
            r = self._client().delete(f"/instances/{resource_id}")
        except httpx.HTTPError as exc:
            raise RetriableBackupTargetError(f"{self._where}: deleting {resource_id}: "
                                             f"{exc}") from None
        if r.status_code not in (200, 404):
            raise BackupTargetError(f"{self._where}: deleting {resource_id} answered "
                                    f"{r.status_code}: {r.text[:200]}")

    def patient_instances(self, patient_id: str) -> list[HeldInstance]:
        """Every instance the backup holds of one patient (exact PatientID), with its series'
        modality and its file size."""
        answer = self._post("/tools/find", {"Level": "Instance", "Expand": True,
                                            "Query": {"PatientID": patient_id}})
        series: dict[str, tuple[str, str, str]] = {}
        out = []
        for item in answer:  # type: ignore[union-attr]
            sid = str(item["ParentSeries"])
            if sid not in series:
                s: Any = self._json(self._get(f"/series/{sid}"), "/series")
                study: Any = self._json(self._get(f"/studies/{s['ParentStudy']}"), "/studies")
                tags = s["MainDicomTags"]
                series[sid] = (str(tags.get("Modality", "")),
                               str(tags.get("SeriesInstanceUID", "")),
                               str(study["MainDicomTags"].get("StudyInstanceUID", "")))
            modality, series_uid, study_uid = series[sid]
            out.append(HeldInstance(str(item["ID"]), InstanceRef(
                str(item["MainDicomTags"].get("SOPInstanceUID", "")), "", patient_id, study_uid,
                series_uid), modality, int(item.get("FileSize", 0))))
        return out

    def send(self, modality: str, aet: str, host: str, port: int, resource_ids: list[str],
             associations: int = 1, chunk: int = 500) -> tuple[int, dict[str, str]]:
        """C-STORE instances from the backup to another AE, by Orthanc itself (declared to it
        as ``modality``; in memory unless its modalities live in its database), split in order
        between ``associations`` requests at once (each one association; whole series stay
        together unless a series is larger than a share). Returns how many it sent and, per
        resource ID it could not send, why: a request that fails is sent again one object at
        a time, so one bad object (unparseable, refused by the target) stops only itself. A
        target that cannot be reached is raised, once every request has ended."""
        r = self._client().put(f"/modalities/{modality}",
                               json={"AET": aet, "Host": host, "Port": port})
        if r.status_code >= 400:
            raise BackupTargetError(f"{self._where}: declaring {aet}@{host}:{port} answered "
                                    f"{r.status_code}: {r.text[:200]}")
        shares = max(1, min(associations, len(resource_ids)))
        size = -(-len(resource_ids) // shares) if resource_ids else 0
        parts = [resource_ids[i:i + size] for i in range(0, len(resource_ids), size)] if size \
            else []
        if len(parts) <= 1:
            results = [self._store_share(modality, aet, host, port, part, chunk)
                       for part in parts]
        else:
            with ThreadPoolExecutor(max_workers=len(parts)) as pool:
                futures = [pool.submit(self._store_share, modality, aet, host, port, part, chunk)
                           for part in parts]
            results = [f.result() for f in futures]  # every share has ended: the first error
        failed: dict[str, str] = {}
        for _, why in results:
            failed.update(why)
        return sum(n for n, _ in results), failed

    def _store_share(self, modality: str, aet: str, host: str, port: int,
                     resource_ids: list[str], chunk: int) -> tuple[int, dict[str, str]]:
        sent, failed = 0, {}
        for i in range(0, len(resource_ids), chunk):
            part = resource_ids[i:i + chunk]
            why = self._store(modality, aet, host, port, part)
            if not why:
                sent += len(part)
                continue
            if len(part) == 1:
                failed[part[0]] = why
                continue
            for one in part:  # which of them: one request each
                alone = self._store(modality, aet, host, port, [one])
                if alone:
                    failed[one] = alone
                else:
                    sent += 1
        return sent, failed

    def _store(self, modality: str, aet: str, host: str, port: int, part: list[str]) -> str:
        """One store request; '' when all arrived, else why not (a target that cannot be
        reached is raised)."""
        try:
            r = self._client().post(f"/modalities/{modality}/store", json={
                "Resources": part, "Synchronous": True}, timeout=max(60.0, len(part)))
        except httpx.HTTPError as exc:
            raise RetriableBackupTargetError(f"{self._where}: C-STORE to {aet}@{host}:"
                                             f"{port}: {exc}") from None
        if r.status_code >= 400:
            text = " ".join(r.text.split())
            if any(m in text for m in ("Cannot associate", "DicomAssociation", "connect")):
                raise RetriableBackupTargetError(f"{self._where}: C-STORE to {aet}@{host}:"
                                                 f"{port} failed ({r.status_code}): "
                                                 f"{text[:300]}")
            return f"C-STORE failed ({r.status_code}): {text[:300]}"
        body = r.json() if r.content else {}
        failed = int(body.get("FailedInstancesCount", 0) or 0)
        return f"{aet} refused {failed} of {len(part)}" if failed else ""

    def _statistics(self) -> Any:
        return self._json(self._get("/statistics"), "/statistics")

    def disk_size(self) -> int:
        """Bytes the backup's storage holds (``/statistics``): a long run's progress in GB."""
        return int(self._statistics().get("TotalDiskSize", 0))

    def instance_count(self) -> int:
        """How many instances the backup holds, all kinds (``/statistics``)."""
        return int(self._statistics()["CountInstances"])

    def change_at(self, seq: int) -> str | None:
        """The change log's entry ``seq`` as 'ChangeType ID', or None if it is not there (its
        resource was deleted, or this is another database)."""
        page = self._json(self._get(f"/changes?since={seq - 1}&limit=1"), "/changes")
        changes = page["Changes"]  # type: ignore[index]
        if changes and changes[0]["Seq"] == seq:
            return f"{changes[0]['ChangeType']} {changes[0]['ID']}"
        return None

    def last_change(self) -> int:
        last = self._json(self._get("/changes?last"), "/changes")
        return int(last["Last"])  # type: ignore[index]

    def changes_since(self, seq: int, page: int = 10000) -> ChangeSummary:
        """The instances the change log says arrived after ``seq``. Orthanc removes a deleted
        resource's entries from the log, so deletions do not show here (see report_listing)."""
        out = ChangeSummary(last=seq)
        while True:
            data = self._json(self._get(f"/changes?since={out.last}&limit={page}"), "/changes")
            out.new_instances += [c["ID"] for c in data["Changes"]  # type: ignore[index]
                                  if c["ChangeType"] == "NewInstance"]
            out.last = max(out.last, int(data["Last"]))  # type: ignore[index]
            if data["Done"] or not data["Changes"]:  # type: ignore[index]
                return out

    def only_records(self, instance_ids: Iterable[str]) -> list[str]:
        """Those of the instances that are RT Records (by their series' Modality; instances
        deleted since are skipped)."""
        modality: dict[str, str] = {}
        found: list[str] = []
        for instance_id in instance_ids:
            r = self._get(f"/instances/{instance_id}")
            if r.status_code == 404:
                continue
            series_id = str(self._json(r, "/instances")["ParentSeries"])  # type: ignore[index]
            if series_id not in modality:
                series = self._json(self._get(f"/series/{series_id}"), "/series")
                tags = series.get("MainDicomTags", {})  # type: ignore[union-attr]
                modality[series_id] = str(tags.get("Modality", ""))
            if modality[series_id] == "RTRECORD":
                found.append(instance_id)
        return found


@dataclass
class HeldInstance:
    resource_id: str
    ref: InstanceRef
    modality: str
    size: int


@dataclass
class ChangeSummary:
    last: int
    new_instances: list[str] = field(default_factory=list)


class DicomScpBackup:
    confirms_on_receipt = False  # some PACS index received objects later: wait and ask again

    def __init__(self, site: Site, alias: str, target: DicomScpTarget) -> None:
        self.alias = alias
        self.aet = target.aet
        self.client = site.client(target)

    def holds_rt_records(self) -> bool:
        """Whether the backup holds any RT Record series at all (a ledger may have been lost)."""
        return any("SeriesInstanceUID" in m for m in self.client.find(identifier(
            "SERIES", Modality="RTRECORD", SeriesInstanceUID="")))

    def present(self, refs: Iterable[InstanceRef]) -> set[str]:
        by_series: dict[tuple[str, str, str], list[str]] = defaultdict(list)
        for r in refs:
            by_series[r.series_key].append(r.sop_instance_uid)
        found: set[str] = set()
        for (patient_id, study, series), uids in by_series.items():
            for i in range(0, len(uids), _FIND_CHUNK):
                q = identifier("IMAGE", PatientID=patient_id, StudyInstanceUID=study,
                               SeriesInstanceUID=series, SOPInstanceUID=uids[i:i + _FIND_CHUNK])
                found.update(str(m.SOPInstanceUID) for m in self.client.find(q)
                             if "SOPInstanceUID" in m)
        return found


    def series_instances(self, patient_id: str, study_uid: str, series_uid: str) -> set[str]:
        q = identifier("IMAGE", PatientID=patient_id, StudyInstanceUID=study_uid,
                       SeriesInstanceUID=series_uid, SOPInstanceUID="")
        return {str(m.SOPInstanceUID) for m in self.client.find(q) if "SOPInstanceUID" in m}

    def read(self, sop_instance_uid: str) -> Dataset | None:
        raise BackupTargetError(f"backup {self.alias} ({self.aet}) is a plain DICOM SCP: reading "
                                "references from the backup needs an 'orthanc' target")


def open_backup(site: Site, alias: str | None = None) -> OrthancBackup | DicomScpBackup:
    name, target = site.backup(alias)
    if isinstance(target, OrthancTarget):
        return OrthancBackup(site, name, target)
    return DicomScpBackup(site, name, target)


def wait_for(target: BackupTarget, refs: list[InstanceRef], timeout: float) -> set[str]:
    """Presence of ``refs``, re-asking for the missing ones for up to ``timeout`` seconds.

    Some PACS index received objects asynchronously, so a plain DICOM target is asked again.
    Orthanc stores and indexes an object before it acknowledges the C-STORE: its first answer is
    final, and a refused object is reported at once instead of after ``timeout`` (which, plan
    after plan, once made 14 plans with a refused dose take 426 s).
    """
    found = target.present(refs)
    if target.confirms_on_receipt:
        return found
    deadline = time.monotonic() + timeout
    delay = 0.25
    while len(found) < len({r.sop_instance_uid for r in refs}) and time.monotonic() < deadline:
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay *= 2
        found |= target.present([r for r in refs if r.sop_instance_uid not in found])
    return found
