"""Leaf types every layer shares: what a plan is, what a source hands back, what one series
left on disk. No behaviour beyond formatting and arithmetic on their own fields, and no import
of another harvester module: sources, the store, the engine and the facade all meet here without
importing each other (the dependency rule of ``tests/test_layers.py``).

* ``SeriesTask``, ``Plan`` (with ``CollectionTotals``, ``UnavailableSeries``): a source's planner
  makes them, the engine, the layout and the manifest read them.
* ``VerifiedFile``, ``Repair``, ``UnpackedSeries``, ``AnnotationFile``, ``AnnotatedSeries``: what a
  source leaves in staging after verifying a series; the engine records them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SeriesTask:
    """Everything the engine, the layout and the manifest need about one series."""

    series_uid: str
    collection: str
    patient_id: str
    study_uid: str
    modality: str
    image_count: int | None
    file_size: int | None
    row: dict[str, Any] = field(hash=False, compare=False)          # the getSeries row as received
    study: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    patient: dict[str, Any] | None = field(default=None, hash=False, compare=False)

    def layout_fields(self) -> dict[str, Any]:
        """Fields for path templates: the getSeries row plus study details."""
        fields: dict[str, Any] = dict(self.row)
        study = self.study or {}
        fields.setdefault("StudyDate", study.get("StudyDate"))
        fields["StudyDate"] = fields.get("StudyDate") or study.get("StudyDate")
        fields["StudyID"] = study.get("StudyID", "")
        fields["StudyDescription"] = study.get("StudyDescription") or self.row.get("StudyDesc") or ""
        fields["PatientName"] = (self.patient or {}).get("PatientName") or study.get("PatientName") or ""
        fields.update(Collection=self.collection, PatientID=self.patient_id,
                      StudyInstanceUID=self.study_uid, SeriesInstanceUID=self.series_uid, Modality=self.modality)
        return fields


@dataclass
class CollectionTotals:
    series: int = 0
    images: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class UnavailableSeries:
    """A series a list asked for that the archive did not give: no row, or a refusal."""

    series_uid: str
    origin: str     # the selector (file and key) that listed it
    reason: str     # what the archive said: one line, URLs redacted, server text bounded

    def to_json(self) -> dict[str, str]:
        return {"SeriesInstanceUID": self.series_uid, "origin": self.origin, "reason": self.reason}


@dataclass(repr=False)
class Plan:
    tasks: list[SeriesTask]
    requests: int = 0
    retries: int = 0
    unavailable: list[UnavailableSeries] = field(default_factory=list)   # in the lists' order
    #: One line each, said once per plan: selectors matching nothing, rows kept without a readable
    #: release date (the CLI prints them; ``aharvest`` emits "warning" events).
    warnings: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        # Short on purpose: asyncio formats a task's result on some paths, and the default
        # dataclass repr of 20,000 tasks (each with its row) cost 0.7 s of a 2 s plan.
        return f"Plan({len(self.tasks)} series, {self.requests} requests, {self.retries} retries)"

    @property
    def collections(self) -> dict[str, CollectionTotals]:
        out: dict[str, CollectionTotals] = {}
        for t in self.tasks:
            c = out.setdefault(t.collection, CollectionTotals())
            c.series += 1
            c.images += t.image_count or 0
            c.bytes += t.file_size or 0
        return dict(sorted(out.items()))

    def to_json(self) -> dict[str, Any]:
        cols = self.collections
        out: dict[str, Any] = {
            "series": len(self.tasks),
            "images": sum(c.images for c in cols.values()),
            "bytes": sum(c.bytes for c in cols.values()),
            "collections": {k: {"series": v.series, "images": v.images, "bytes": v.bytes} for k, v in cols.items()},
        }
        if self.unavailable:
            out["unavailable"] = [u.to_json() for u in self.unavailable]
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out



@dataclass(frozen=True)
class VerifiedFile:
    name: str            # file name inside the series folder
    size: int
    md5: str
    sop_uid: str
    sop_class_uid: str = ""
    md5_checked: bool = True  # False: the archive listed no MD5 for it; ``md5`` is what arrived


@dataclass(frozen=True)
class Repair:
    """A file whose bytes failed their MD5 but whose header still names this series: it can be
    fetched alone with getSingleImage instead of refetching the whole series."""

    name: str
    sop_uid: str
    md5: str


@dataclass(frozen=True)
class UnpackedSeries:
    files: list[VerifiedFile]
    license_text: str | None
    repairs: list[Repair]

    @property
    def without_md5(self) -> int:
        """Files verified by count, size, CRC-32 and DICOM only (the archive had no MD5 for them)."""
        return sum(not f.md5_checked for f in self.files)



@dataclass(frozen=True)
class AnnotationFile:
    name: str            # file name inside the series folder
    size: int
    md5: str

    def to_json(self, folder: str) -> dict[str, Any]:
        """The entry of harvest.json's ``annotations`` list (paths relative to DIR, like ``files``)."""
        return {"path": f"{folder}/{self.name}", "size": self.size, "md5": self.md5}


@dataclass(frozen=True)
class AnnotatedSeries(UnpackedSeries):
    """A series unpacked from getImage, plus the annotation files placed beside it."""

    annotations: tuple[AnnotationFile, ...] = ()
