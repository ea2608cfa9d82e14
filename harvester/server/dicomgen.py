"""Deterministic DICOM files for the synthetic archive (pydicom 2.4 and 3.x).

One template :class:`pydicom.Dataset` per series; each instance only changes its
SOPInstanceUID, InstanceNumber, position and pixel data, which keeps generation near a
millisecond per small file. Every value derives from the caller's seed, and the file meta
names our own implementation, so the bytes are identical across builds and pydicom versions.
"""
from __future__ import annotations

import hashlib
import io
import random
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

PYDICOM_MAJOR = int(pydicom.__version__.split(".")[0])

#: SOP Class UID of each modality the generator knows.
SOP_CLASSES: dict[str, str] = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",        # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",        # MR Image Storage
    "PT": "1.2.840.10008.5.1.4.1.1.128",      # Positron Emission Tomography Image Storage
    "CR": "1.2.840.10008.5.1.4.1.1.1",        # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",      # Digital X-Ray Image Storage - For Presentation
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",      # Digital Mammography X-Ray Image Storage
    "NM": "1.2.840.10008.5.1.4.1.1.20",       # Nuclear Medicine Image Storage
    "US": "1.2.840.10008.5.1.4.1.1.6.1",      # Ultrasound Image Storage
}
IMPLEMENTATION_UID = "2.25.155555238393129813862924566512405216941"
IMPLEMENTATION_VERSION = "HARVESTER_SYN1"
MAX_ROWS = 65535


def make_uid(*parts: object) -> str:
    """A DICOM UID (``2.25.<decimal>``, at most 44 characters) derived from ``parts``."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def seeded_rng(*parts: object) -> random.Random:
    """A ``random.Random`` whose stream depends only on ``parts`` (stable across runs)."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclass(frozen=True)
class PixelGeometry:
    """16-bit monochrome frame with ``rows * columns * 2 == size``."""

    rows: int
    columns: int

    @property
    def size(self) -> int:
        return self.rows * self.columns * 2

    @classmethod
    def for_size(cls, size: int) -> PixelGeometry:
        """Columns = 256 when it divides, else the largest divisor below 256.

        Raises ``ValueError`` for an odd or non-positive size, or one needing > 65535 rows.
        """
        if size <= 0 or size % 2:
            raise ValueError(f"pixel data size must be a positive even number of bytes, not {size}")
        pixels = size // 2
        columns = next(c for c in range(min(256, pixels), 0, -1) if pixels % c == 0)
        rows = pixels // columns
        if rows > MAX_ROWS:
            raise ValueError(f"pixel data size {size} needs {rows} rows (> {MAX_ROWS}); use a smaller size")
        return cls(rows, columns)


def dicom_text(value: str, limit: int = 64) -> str:
    """A metadata string made safe for a DICOM text element: no control characters, ``\\`` or
    over-long values (the hostile API rows keep the raw value)."""
    cleaned = "".join(ch for ch in value if ch.isprintable() and ch != "\\")
    return cleaned[:limit]


def series_template(modality: str, geometry: PixelGeometry, tags: Mapping[str, Any]) -> Dataset:
    """The dataset shared by every instance of one series.

    ``tags`` holds keyword -> value for the patient/study/series elements (PatientID,
    StudyInstanceUID, SeriesDescription, ...). Raises ``KeyError`` for an unknown modality.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(SOP_CLASSES[modality])
    meta.MediaStorageSOPInstanceUID = UID("1.2")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    if PYDICOM_MAJOR < 3:
        ds.is_little_endian = True
        ds.is_implicit_VR = False
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = SOP_CLASSES[modality]
    ds.SOPInstanceUID = "1.2"
    ds.Modality = modality
    for keyword, value in tags.items():
        if value not in (None, ""):
            setattr(ds, keyword, value)
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceThickness = "2.5"
    ds.PixelSpacing = ["0.703125", "0.703125"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = geometry.rows
    ds.Columns = geometry.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def encode_instance(template: Dataset, sop_uid: str, number: int, pixels: bytes) -> bytes:
    """The file bytes of one instance: ``template`` with this instance's elements set.

    Mutates ``template`` (the per-instance elements are overwritten by the next call).
    """
    template.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    template.SOPInstanceUID = sop_uid
    template.InstanceNumber = number
    template.ImagePositionPatient = ["0", "0", f"{-2.5 * (number - 1):.1f}"]
    template.PixelData = pixels
    template["PixelData"].VR = "OW"
    buf = io.BytesIO()
    if PYDICOM_MAJOR >= 3:
        pydicom.dcmwrite(buf, template, enforce_file_format=True)  # type: ignore[call-arg, unused-ignore]
    else:
        pydicom.dcmwrite(buf, template, write_like_original=False)  # type: ignore[call-arg, unused-ignore]
    return buf.getvalue()


@dataclass(frozen=True)
class WrittenFile:
    """A file written under the cache root: path relative to it, size, MD5, CRC-32."""

    relpath: str
    size: int
    md5: str
    crc32: int


def store(root: Path, relpath: str, data: bytes) -> WrittenFile:
    """Write ``data`` to ``root/relpath`` (creating folders) and describe it. Raises ``OSError``."""
    target = root / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return WrittenFile(relpath, len(data), hashlib.md5(data).hexdigest(), zlib.crc32(data))


@dataclass(frozen=True)
class WrittenInstance:
    """One generated instance: its SOPInstanceUID, InstanceNumber and file."""

    sop_uid: str
    number: int
    file: WrittenFile


def write_mask_series(root: Path, reldir: str, template: Dataset, series_uid: str, count: int,
                      geometry: PixelGeometry, seed: int) -> list[WrittenInstance]:
    """Write ``count`` mostly-zero instances (a binary mask: one small square of ones per frame,
    placed by an RNG seeded by (seed, series UID)), as ``root/reldir/000001.dcm``...

    They deflate at over 800:1, as real segmentations do. Raises ``OSError`` when writing fails.
    """
    rng = seeded_rng("mask", seed, series_uid)
    written: list[WrittenInstance] = []
    side = min(16, geometry.rows, geometry.columns)
    for number in range(1, count + 1):
        mask = bytearray(geometry.size)
        top, left = rng.randrange(geometry.rows - side + 1), rng.randrange(geometry.columns - side + 1)
        for r in range(top, top + side):
            start = 2 * (r * geometry.columns + left)
            mask[start:start + 2 * side] = b"\x01\x00" * side
        sop_uid = make_uid("sop", seed, series_uid, number)
        data = encode_instance(template, sop_uid, number, bytes(mask))
        written.append(WrittenInstance(sop_uid, number, store(root, f"{reldir}/{number:06d}.dcm", data)))
    return written


def write_series(root: Path, reldir: str, template: Dataset, series_uid: str, count: int,
                 pixel_bytes: int, seed: int) -> list[WrittenInstance]:
    """Write ``count`` instances of one series as ``root/reldir/000001.dcm``...

    Pixel data comes from an RNG seeded by (seed, series UID), so a series' files do not
    depend on what else is generated. Raises ``OSError`` when writing fails.
    """
    rng = seeded_rng("pixels", seed, series_uid)
    written: list[WrittenInstance] = []
    for number in range(1, count + 1):
        sop_uid = make_uid("sop", seed, series_uid, number)
        data = encode_instance(template, sop_uid, number, rng.randbytes(pixel_bytes))
        written.append(WrittenInstance(sop_uid, number, store(root, f"{reldir}/{number:06d}.dcm", data)))
    return written
