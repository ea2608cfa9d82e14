"""The HOSTILE collection: metadata and ZIPs that a safe client must survive.

Every series looks normal in getSeries (ImageCount and FileSize are those of its three real
instances) so a client really downloads it; its metadata carries path-hostile values (``..``,
``/``, control characters, Windows device names, a 300-character description), and its ZIP
carries one attack, named by ``hostile_kind`` and at the start of its SeriesDescription
(``HOSTILE:<kind> ...``):

``traversal``  an entry named ``../../harvester-traversal.dcm``
``absolute``   an entry named ``/tmp/harvester-absolute.dcm``
``symlink``    an extra entry that is a symlink (S_IFLNK) to ``/etc/passwd``
``zipbomb``    an extra entry of 200 MiB of zeros deflated to ~200 KB
``duplicate``  two entries with the same name and different contents
``nondicom``   an entry of random bytes (size and MD5 listed correctly, but not DICOM)
``foreign``    an entry that is a DICOM file of another series

md5hashes.csv lists the bytes actually sent (except for the symlink and bomb entries), so
only the defence against the specific attack can catch it. Every entry is DEFLATED, as the
real service sends them.
"""
from __future__ import annotations

import hashlib
import stat
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harvester.server.dicomgen import (
    PixelGeometry,
    WrittenInstance,
    dicom_text,
    make_uid,
    seeded_rng,
    series_template,
    write_series,
)

COLLECTION = "HOSTILE"
KINDS = ("traversal", "absolute", "symlink", "zipbomb", "duplicate", "nondicom", "foreign")
INSTANCES_PER_SERIES = 3
PIXEL_BYTES = 4096
BOMB_BYTES = 200 * 1024 * 1024
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)

_LONG = ("A 300 character description / with slashes .. and dots " * 6)[:300]
#: Hostile patients: (PatientID, StudyDescription).
PATIENTS: tuple[tuple[str, str], ...] = (
    ("../../etc", "../../.."),
    ("CON", "CHEST/ABD W CONTRAST 2.5mm"),
    ("a/b\\c:d*e?f|g<h>", "AUX.txt"),
    ("\x1b[31mRED\x1b[0m\tTAB", _LONG),
)
_SERIES_SUFFIX = (
    "../../../tmp", "CON", "NUL.txt", "\x1b]0;pwned\x07\ttabbed", "LPT1 / COM1", _LONG,
    "  trailing dots...  ", "C:\\Windows\\System32",
)


@dataclass
class HostileSeries:
    """One generated hostile series, before the archive adds release dates and sizes."""

    kind: str
    row: dict[str, Any]
    patient: dict[str, Any]
    study: dict[str, Any]
    instances: list[WrittenInstance]
    zip_relpath: str


def _zip_info(name: str, *, compress: int = zipfile.ZIP_DEFLATED) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.compress_type = compress
    info.create_system = 3
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info


def _write_zip(path: Path, kind: str, files: list[tuple[str, bytes]], license_text: str,
               foreign: bytes) -> None:
    """Write the hostile ZIP for ``kind`` from the series' real (name, bytes) files."""
    entries: list[tuple[str, bytes]] = list(files)
    if kind == "traversal":
        entries[1] = ("../../harvester-traversal.dcm", entries[1][1])
    elif kind == "absolute":
        entries[1] = ("/tmp/harvester-absolute.dcm", entries[1][1])
    elif kind == "duplicate":
        entries[2] = (entries[1][0], entries[2][1])
    elif kind == "nondicom":
        entries[1] = (entries[1][0], seeded_rng("nondicom").randbytes(len(entries[1][1])))
    elif kind == "foreign":
        entries[1] = (entries[1][0], foreign)
    extra_name = f"{len(files) + 1:08d}.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name on purpose
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(_zip_info("LICENSE"), license_text.encode("utf-8"))
            for name, data in entries:
                zf.writestr(_zip_info(name), data)
            if kind == "symlink":
                link = _zip_info(extra_name)
                link.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(link, b"/etc/passwd")
            elif kind == "zipbomb":
                zeros = bytes(1 << 20)
                with zf.open(_zip_info(extra_name, compress=zipfile.ZIP_DEFLATED), "w") as bomb:
                    for _ in range(BOMB_BYTES // len(zeros)):
                        bomb.write(zeros)
            md5_lines = ["Filename,MD5Hash"] + [f"{n},{hashlib.md5(d).hexdigest()}" for n, d in entries]
            zf.writestr(_zip_info("md5hashes.csv"), ("\r\n".join(md5_lines) + "\r\n").encode("utf-8"))


def build_hostile(root: Path, reldir: str, seed: int, license_text: str) -> list[HostileSeries]:
    """Generate the HOSTILE collection under ``root/reldir``: files, ZIPs and rows.

    Raises ``OSError`` when writing fails.
    """
    geometry = PixelGeometry.for_size(PIXEL_BYTES)
    made: list[HostileSeries] = []
    for k, kind in enumerate(KINDS):
        patient_id, study_desc = PATIENTS[k % len(PATIENTS)]
        study_uid = make_uid("hostile-study", seed, k % len(PATIENTS))
        series_uid = make_uid("hostile-series", seed, kind)
        series_desc = f"HOSTILE:{kind} {_SERIES_SUFFIX[k % len(_SERIES_SUFFIX)]}"
        row: dict[str, Any] = {
            "SeriesInstanceUID": series_uid, "StudyInstanceUID": study_uid, "Modality": "CT",
            "ProtocolName": "../PROTOCOL/..", "SeriesDate": "2010-10-10", "SeriesDescription": series_desc,
            "BodyPartExamined": "CHEST/ABDOMEN", "SeriesNumber": k + 1, "Collection": COLLECTION,
            "Site": "Site/../Hostile", "PatientID": patient_id, "PatientSex": "O", "PatientAge": "042Y",
            "Manufacturer": "ACME/../Imaging", "ManufacturerModelName": "Model\tX",
            "SoftwareVersions": "1.0\\2.0", "StudyDesc": study_desc, "StudyDate": "2010-10-10",
        }
        patient = {"PatientId": patient_id, "PatientName": patient_id, "PatientSex": "O", "Collection": COLLECTION}
        study = {"StudyInstanceUID": study_uid, "StudyDate": "2010-10-10", "StudyDescription": study_desc,
                 "StudyID": "../1", "PatientAge": "042Y", "PatientID": patient_id, "PatientName": patient_id,
                 "PatientSex": "O", "Collection": COLLECTION}
        template = series_template("CT", geometry, {
            "PatientID": dicom_text(patient_id), "PatientName": dicom_text(patient_id),
            "PatientSex": "O", "PatientAge": "042Y", "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": series_uid, "StudyDate": "20101010", "SeriesDate": "20101010",
            "StudyTime": "101010", "StudyID": "1", "StudyDescription": dicom_text(study_desc),
            "SeriesDescription": dicom_text(series_desc), "SeriesNumber": k + 1,
            "BodyPartExamined": "CHEST", "Manufacturer": dicom_text(row["Manufacturer"]),
            "ManufacturerModelName": "Model X", "FrameOfReferenceUID": make_uid("hostile-for", seed, kind),
        })
        series_dir = f"{reldir}/{k:02d}-{kind}"
        instances = write_series(root, series_dir, template, series_uid, INSTANCES_PER_SERIES,
                                 geometry.size, seed)
        files = [(f"{i.number:08d}.dcm", (root / i.file.relpath).read_bytes()) for i in instances]
        # the foreign entry is a DICOM file of the first hostile series (KINDS[0] is not "foreign")
        source = made[0].instances[0] if made else instances[0]
        zip_relpath = f"{reldir}/{kind}.zip"
        _write_zip(root / zip_relpath, kind, files, license_text, (root / source.file.relpath).read_bytes())
        made.append(HostileSeries(kind, row, patient, study, instances, zip_relpath))
    return made


__all__ = ["COLLECTION", "KINDS", "HostileSeries", "build_hostile", "BOMB_BYTES"]
