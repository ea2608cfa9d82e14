"""Leaf types every layer shares: what a plan is, what a source hands back, what one series
left on disk. No behaviour beyond formatting and arithmetic on their own fields, and no import
of a harvester module but leaves: sources, the store, the engine and the facade all meet here
without importing each other (the dependency rule of ``tests/test_layers.py``).

* ``SeriesTask``, ``Plan`` (with ``CollectionTotals``, ``UnavailableSeries``): a source's planner
  makes them, the engine, the layout and the manifest read them.
* ``VerifiedFile``, ``Repair``, ``UnpackedSeries``, ``AnnotationFile``, ``AnnotatedSeries``: what a
  source leaves in staging after verifying a series; the engine records them.
* ``SeriesRecord``: one series record of harvest.json, typed, read from files of every version.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from harvester.units import as_int


@dataclass(frozen=True, slots=True)
class SeriesTask:
    """Everything the engine, the layout and the manifest need about one series.

    Slotted: a plan of all of TCIA holds about 500,000 of them, and a ``__dict__`` each was
    about 300 bytes of them."""

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


@runtime_checkable
class TaskStore(Protocol):
    """A plan's tasks kept outside memory, in order (``harvester.store.plan.PlanTable``): the
    planner ``add``s them as it makes them; readers go through them a batch at a time."""

    def add(self, tasks: Iterable[SeriesTask]) -> None: ...

    def __iter__(self) -> Iterator[SeriesTask]: ...

    def __len__(self) -> int: ...

    def batches(self, size: int = ...) -> Iterator[list[SeriesTask]]: ...

    def select(self, wanted: Callable[[str], bool], size: int = ...) -> Iterator[list[SeriesTask]]: ...

    def sizes(self) -> Iterator[tuple[str, int | None, int | None]]: ...

    def uids(self) -> Iterator[str]: ...

    def totals(self) -> dict[str, CollectionTotals]: ...


@dataclass(repr=False)
class Plan:
    #: the tasks in memory; empty when they went to ``stored`` (a harvest's plan)
    tasks: list[SeriesTask]
    requests: int = 0
    retries: int = 0
    unavailable: list[UnavailableSeries] = field(default_factory=list)   # in the lists' order
    #: One line each, said once per plan: selectors matching nothing, rows kept without a readable
    #: release date (the CLI prints them; ``aharvest`` emits "warning" events).
    warnings: list[str] = field(default_factory=list)
    #: where the tasks went instead of ``tasks`` when the plan was made into a store
    stored: TaskStore | None = None

    def __repr__(self) -> str:
        # Short on purpose: asyncio formats a task's result on some paths, and the default
        # dataclass repr of 20,000 tasks (each with its row) cost 0.7 s of a 2 s plan.
        return f"Plan({self.series} series, {self.requests} requests, {self.retries} retries)"

    @property
    def series(self) -> int:
        """How many series the plan holds (in memory or stored)."""
        return len(self.stored) if self.stored is not None else len(self.tasks)

    def sizes(self) -> Iterable[tuple[str, int | None, int | None]]:
        """(uid, image count, bytes) of every task in order (from a store, without its rows)."""
        if self.stored is not None:
            return self.stored.sizes()
        return ((t.series_uid, t.image_count, t.file_size) for t in self.tasks)

    def all_tasks(self) -> Iterable[SeriesTask]:
        """Every task in order: ``tasks``, or the store's, streamed a batch at a time."""
        return self.stored if self.stored is not None else self.tasks

    @property
    def collections(self) -> dict[str, CollectionTotals]:
        if self.stored is not None:
            return dict(sorted(self.stored.totals().items()))
        out: dict[str, CollectionTotals] = {}
        for t in self.tasks:
            c = out.setdefault(t.collection, CollectionTotals())
            c.series += 1
            c.images += t.image_count or 0
            c.bytes += t.file_size or 0
        return dict(sorted(out.items()))

    def to_json(self, **dumps: Any) -> str:
        """``to_dict()`` as a JSON string (``dumps``: ``json.dumps`` options, e.g. ``indent=1``)."""
        return json.dumps(self.to_dict(), **dumps)

    def to_dict(self) -> dict[str, Any]:
        """The totals: series, images and bytes in all and per collection, and the unavailable
        series and the warnings when there are any."""
        cols = self.collections
        out: dict[str, Any] = {
            "series": self.series,
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


#: the record keys ``SeriesRecord`` types; every other key of a record is kept as it came
_RECORD_KEYS = ("SeriesInstanceUID", "Collection", "PatientID", "StudyInstanceUID", "Modality", "status", "path",
                "bytes", "attempts", "error", "error_kind", "completed", "sop_class_uid", "files", "metadata",
                "patient", "study")


@dataclass(frozen=True)
class SeriesRecord:
    """One series record of harvest.json (and of the journal), typed.

    ``from_json`` takes a record that passed ``harvester.store.state.record_problem`` (the
    checks of a hostile directory), from this version or an earlier one: every key but
    SeriesInstanceUID may be missing (earlier versions wrote no ``attempts``, ``error_kind``,
    ``sop_class_uid``, ``patient`` or ``study``). ``to_json`` gives the same record back, key
    for key: keys it does not type (``annotations``, ``files_without_md5``, what a later
    version adds) are kept in ``extra``, and a key the record did not have is not added.
    (Collection, PatientID, StudyInstanceUID and Modality are read as text, as every version
    wrote them; a record holding another type there comes back as text.)
    """

    series_uid: str
    collection: str = ""
    patient_id: str = ""
    study_uid: str = ""
    modality: str = ""
    status: str | None = None
    path: str | None = None
    bytes: int | None = None
    attempts: int | None = None
    error: str | None = None
    error_kind: str | None = None
    completed: str | None = None
    sop_class_uid: str | None = None
    files: tuple[dict[str, Any], ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    patient: dict[str, Any] | None = None
    study: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: the typed keys the record carried (so that ``to_json`` adds none)
    present: frozenset[str] = frozenset()

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @classmethod
    def from_json(cls, rec: dict[str, Any]) -> SeriesRecord:
        """The typed record. Raises ``ValueError`` when ``rec`` has no SeriesInstanceUID (the
        one key every version wrote); types are the caller's check (``record_problem``)."""
        uid = rec.get("SeriesInstanceUID") if isinstance(rec, dict) else None
        if not isinstance(uid, str) or not uid:
            raise ValueError("a series record without a SeriesInstanceUID")
        return cls(
            series_uid=uid, collection=str(rec.get("Collection") or ""), patient_id=str(rec.get("PatientID") or ""),
            study_uid=str(rec.get("StudyInstanceUID") or ""), modality=str(rec.get("Modality") or ""),
            status=rec.get("status"), path=rec.get("path"), bytes=rec.get("bytes"), attempts=rec.get("attempts"),
            error=rec.get("error"), error_kind=rec.get("error_kind"), completed=rec.get("completed"),
            sop_class_uid=rec.get("sop_class_uid"), files=tuple(rec.get("files") or ()),
            metadata=dict(rec.get("metadata") or {}), patient=rec.get("patient"), study=rec.get("study"),
            extra={k: v for k, v in rec.items() if k not in _RECORD_KEYS},
            present=frozenset(k for k in _RECORD_KEYS if k in rec))

    def to_json(self) -> dict[str, Any]:
        """The record as harvest.json holds it (see the class docstring)."""
        typed = {"SeriesInstanceUID": self.series_uid, "Collection": self.collection, "PatientID": self.patient_id,
                 "StudyInstanceUID": self.study_uid, "Modality": self.modality, "status": self.status,
                 "path": self.path, "bytes": self.bytes, "attempts": self.attempts, "error": self.error,
                 "error_kind": self.error_kind, "completed": self.completed, "sop_class_uid": self.sop_class_uid,
                 "files": list(self.files), "metadata": self.metadata, "patient": self.patient, "study": self.study}
        present = self.present or frozenset(_RECORD_KEYS)
        return {**{k: v for k, v in typed.items() if k in present or k == "SeriesInstanceUID"}, **self.extra}

    def task(self) -> SeriesTask:
        """The task that fetches this series again (repair): the recorded getSeries row, its
        count and size (the recorded files when the row has none), study and patient."""
        image_count = as_int(self.metadata.get("ImageCount")) or len(self.files)
        return SeriesTask(series_uid=self.series_uid, collection=self.collection, patient_id=self.patient_id,
                          study_uid=self.study_uid, modality=self.modality, image_count=image_count,
                          file_size=as_int(self.metadata.get("FileSize")) or self.bytes, row=dict(self.metadata),
                          study=self.study, patient=self.patient)
