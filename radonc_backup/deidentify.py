"""Pseudonymization for exports: DICOM PS3.15 Annex E's Basic Application Level Confidentiality
Profile, with the Retain Longitudinal Temporal Information with Modified Dates Option.

Two passes over each dataset, nested sequences included:
1. dicognito replaces names, IDs, dates (shifted by one offset per export, so intervals stay
   true), addresses and every UID, consistently across the export: a record still references
   its plan, the plan its structure set, the structure set its images.
2. Table E.1-1 (``data/ps315_basic_profile.csv``, one action per attribute) is applied to what
   the first pass left as it was: ``X`` removed, ``Z`` emptied, ``D`` replaced by a dummy of its
   VR; the combinations (``X/Z``, ``X/D``, ``Z/D``, ``X/Z/D``) take the form that keeps the
   object valid (empty, or a dummy); a value the first pass replaced already counts as the
   dummy (a pseudonymous PatientID, a shifted date). Private attributes, curves (50xx) and
   overlay data and comments (60xx,3000/4000) are removed. The Retain Safe Private Option is
   not applied: every private attribute goes.
Then PatientIdentityRemoved YES and the De-identification Method (text and codes 113100,
113107) say what was done; ``MANIFEST`` is what the export's manifest names.
"""

from __future__ import annotations

import csv
import hashlib
import secrets
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

PROFILE_FILE = Path(__file__).parent / "data" / "ps315_basic_profile.csv"
METHOD = ("RadOnc Backup export: dicognito pseudonyms, then DICOM PS3.15 Basic Application Level "
          "Confidentiality Profile; dates shifted (Modified Dates Option)")
CODES = [("113100", "Basic Application Confidentiality Profile"),
         ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")]
MANIFEST = {"profile": "DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile "
                       "(113100)",
            "options": ["Retain Longitudinal Temporal Information with Modified Dates (113107): "
                        "dates shifted by one offset per export"],
            "not applied": ["Retain Safe Private (every private attribute removed)",
                            "Retain UIDs (every UID replaced, references kept)",
                            "Clean Descriptors, Clean Pixel Data, Clean Graphics"]}
DUMMY = {"PN": "ANONYMOUS", "LO": "ANONYMIZED", "SH": "ANONYMIZED", "ST": "ANONYMIZED",
         "LT": "ANONYMIZED", "UT": "ANONYMIZED", "UC": "ANONYMIZED", "CS": "ANONYMIZED",
         "AE": "ANONYMIZED", "DA": "19000101", "TM": "000000", "DT": "19000101000000",
         "AS": "000Y", "IS": "0", "DS": "0", "UR": "", "UI": None}


@lru_cache(maxsize=1)
def actions() -> dict[int, str]:
    """Tag -> the Basic Profile's action for it."""
    with PROFILE_FILE.open(encoding="utf-8") as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
        return {int(r["tag"], 16): r["action"] for r in rows}


def _walk(ds: Dataset, path: tuple[object, ...] = ()) -> Iterator[tuple[tuple[object, ...],
                                                                          object]]:
    """Every element's path (tags and item indexes) and value, nested sequences included."""
    for elem in ds:
        here = (*path, int(elem.tag))
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value or []):
                yield from _walk(item, (*here, i))
        else:
            yield here, elem.value


def snapshot(ds: Dataset) -> dict[tuple[object, ...], object]:
    """The values before the first pass, by path: what it left alone is what the table acts on."""
    table = actions()
    return {path: value for path, value in _walk(ds) if int(path[-1]) in table}  # type: ignore[call-overload]


def apply_profile(ds: Dataset, before: dict[tuple[object, ...], object],
                  new_uid: Callable[[str], str], path: tuple[object, ...] = ()) -> None:
    """Table E.1-1 on ``ds`` (in place), nested sequences too; ``new_uid`` replaces a UID the
    first pass left (the same UID always by the same new one)."""
    table = actions()
    for elem in list(ds):
        tag = elem.tag
        group, element = tag.group, tag.element
        if tag.is_private or 0x5000 <= group <= 0x50FF or (
                0x6000 <= group <= 0x60FF and element in (0x3000, 0x4000)):
            del ds[tag]
            continue
        action = table.get(int(tag))
        here = (*path, int(tag))
        if elem.VR == "SQ":
            if action == "X":
                del ds[tag]
            elif action is None or "U" in action or "D" in action:
                for i, item in enumerate(elem.value or []):  # kept: its items cleaned
                    apply_profile(item, before, new_uid, (*here, i))
            else:  # Z, X/Z: an empty sequence
                elem.value = Sequence()
            continue
        replaced = here in before and before[here] != elem.value
        if action is None or action == "K":
            continue
        if "U" in action:  # a UID: the first pass's, or one of ours, never the original
            if not replaced and elem.VR == "UI" and elem.value:
                elem.value = ([new_uid(str(v)) for v in elem.value] if elem.VM > 1
                              else new_uid(str(elem.value)))
            continue
        if action == "X":
            del ds[tag]
            continue
        if replaced or elem.value in (None, "", b""):
            continue  # the first pass's pseudonym is the dummy; an empty value stays empty
        if "D" not in action:  # Z, X/Z: empty
            elem.value = ""
            continue
        dummy = DUMMY.get(elem.VR, "ANONYMIZED")  # D, X/D, Z/D, X/Z/D: a dummy of its VR
        if dummy is None:
            continue
        if elem.VR in ("OB", "OW", "OF", "OD", "OL", "UN"):
            del ds[tag]
            continue
        elem.value = dummy


def mark(ds: Dataset) -> None:
    """PatientIdentityRemoved and the De-identification Method, as the profile asks."""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD[:64]
    codes = Sequence()
    for value, meaning in CODES:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = codes


class Deidentifier:
    """One per export: the same seed and the same export give the same pseudonyms."""

    def __init__(self, seed: str | None) -> None:
        from dicognito.anonymizer import Anonymizer

        self.first = Anonymizer(seed=seed or None)
        self.salt = seed or secrets.token_hex(16)

    def new_uid(self, uid: str) -> str:
        """A UID of the 2.25 form from a digest of the seed and the original (one per export
        without a seed, stable across exports with one)."""
        digest = hashlib.sha256(f"{self.salt}|{uid}".encode()).digest()[:16]
        return f"2.25.{int.from_bytes(digest, 'big')}"

    def anonymize(self, ds: Dataset) -> None:
        before = snapshot(ds)
        self.first.anonymize(ds)
        apply_profile(ds, before, self.new_uid)
        mark(ds)
