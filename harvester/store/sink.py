"""The one streaming sink: the bytes of a series go in as they arrive, verified files come out.

Each instance is written straight into the staging folder while its MD5 is computed and the
first bytes are kept for the DICOM header check; nothing of the whole series is held in memory
or written twice. Three ways in:

* ``ZipSeriesSink`` takes an NBIA series ZIP as a byte stream (``feed(chunk)``, ``close()``),
  parsed by ``harvester.store.zipread``: DEFLATED with data descriptors as the real service
  sends it, STORED, ZIP64. It applies the checks of ``harvester.unpack.verify_and_unpack``, with
  the same error classes and, where the stream allows it, in the same order.
* ``AnnotationZipSink`` takes getDCMImage's ZIP the same way and keeps only its annotation
  files (``.xml``), checked by ``harvester.annotations``, beside the series' verified files.
* ``InstanceSink`` takes one instance at a time (``start()``, ``write(data)``, ``end()``), as
  DICOMweb's multipart parts arrive, and names each file after its SOPInstanceUID.

Who raises what (``ZipSeriesSink``):

* as soon as an entry's local header or bytes show it: a name that is absolute or climbs out
  (``check_entry_name``), an encrypted entry, a repeated name, more than ``limits.max_entries``
  entries, an entry past ``limits.max_entry_bytes``, all entries together past the announced
  size plus the margin (as ``verify_and_unpack``), LICENSE or md5hashes.csv implausibly large
  -> ``UnsafeArchiveError``; bytes that are not a ZIP this reader can vouch for (a bad CRC-32 or
  deflate stream, a data descriptor or central directory that disagrees with the entries,
  anything after the end record) -> ``IntegrityError``;
* at the central directory: a symbolic link, or a name there that is unsafe -> ``UnsafeArchiveError``;
* at ``close()``, in ``verify_and_unpack``'s order: a ZIP cut short -> ``IntegrityError``; more
  files or bytes than announced -> ``IntegrityError``; fewer -> ``IncompleteSeriesError``; no
  md5hashes.csv, a file not listed there, an MD5 mismatch past ``max_repairs``, a file that is
  not DICOM, of another series, or repeating a SOPInstanceUID -> ``IntegrityError``. The DICOM
  verdict of each file is reached when it ends but reported here, so that a symlink or a
  truncation found later is what the caller hears, as before.
* writing: ``DiskFullError``/``OutputNotWritableError`` (``classify_os_error``).

Once a sink has raised it is dead, and it has removed its staging folder: nothing it wrote is
left anywhere. ``discard()`` does the same for a caller that gives up (a network error).

Memory per series: the batch being handed to the worker thread (``batch_bytes``), one output
step of the ZIP reader (``zipread.OUTPUT_STEP``) plus zlib's window, the first 256 KiB of the
current file, LICENSE and md5hashes.csv (capped), and one small record per file.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
from anyio.lowlevel import RunVar

from harvester.annotations import ANNOTATION_SUFFIX, MAX_ANNOTATION_BYTES, MAX_ANNOTATIONS, annotation_name, check_xml
from harvester.config import TOO_MANY_ENTRIES_HINT, Limits, too_many_entries
from harvester.errors import HarvesterError, IncompleteSeriesError, IntegrityError, OutputNotWritableError, \
    UnsafeArchiveError, classify_os_error
from harvester.models import AnnotationFile, Repair, SeriesTask, UnpackedSeries, VerifiedFile
from harvester.store.layout import instance_filename, name_key, safe_component
from harvester.store.zipread import CentralRecord, LocalEntry, ZipStreamError, ZipStreamReader
from harvester.unpack import (
    _HEAD_BYTES,
    _MORE_THAN_ANNOUNCED,
    LICENSE_NAME,
    MD5_NAME,
    _not_announced,
    check_entry_name,
    dicom_ids_by_pydicom,
    header_ids,
    parse_md5_csv,
    read_dicom_ids,
)

#: bytes gathered from the network before one hop to the worker thread
BATCH_BYTES = 1 << 20
#: worker threads that handle the sinks' batches at once, per event loop (``sink_threads``): the
#: work is inflating, hashing and writing, in C that releases the GIL on every call, so threads
#: past the cores only take turns at the GIL (scenario a: over two million futex calls with one
#: thread per series in flight, the anyio default of up to 40)
SINK_THREADS = max(2, os.cpu_count() or 2)
_SINK_LIMITER: RunVar[anyio.CapacityLimiter] = RunVar("harvester_sink_threads")
#: LICENSE and md5hashes.csv are read into memory up to these sizes (as ``verify_and_unpack``)
_SMALL_CAPS = {LICENSE_NAME: 1 << 20, MD5_NAME: 64 << 20}
_cached_filename = functools.lru_cache(maxsize=1 << 12)(instance_filename)


def _entry_filename(name: str) -> str:
    """The staging file name of a ZIP entry name (``layout.instance_filename``, a pure function):
    the same few names recur in every series of a harvest (``1-01.dcm``...) and are sanitised once
    each; a long name (a hostile ZIP's, up to 64 KiB) is never kept."""
    return _cached_filename(name) if len(name) <= 255 else instance_filename(name)
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


class _InstanceFile:
    """One new file in staging (``O_EXCL``, never through a link), hashed as it is written;
    keeps its first ``_HEAD_BYTES`` for the DICOM header check."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self.size = 0
        self._head: list[bytes] = []   # the first _HEAD_BYTES, as written (joined once, at the check)
        self._md5 = hashlib.md5()
        try:
            self._fd: int | None = os.open(os.path.join(folder, name), _OPEN_FLAGS, 0o644)
        except OSError as exc:
            raise classify_os_error(exc, name) from None

    @property
    def path(self) -> Path:
        return self.folder / self.name

    def write(self, data: bytes | memoryview) -> None:
        assert self._fd is not None
        if self.size < _HEAD_BYTES:  # bytes are kept as they are (no copy); a view is copied
            piece = data[:_HEAD_BYTES - self.size]
            self._head.append(piece if isinstance(piece, bytes) else bytes(piece))
        self.size += len(data)
        self._md5.update(data)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            raise classify_os_error(exc, self.name) from None

    def sync_and_close(self) -> str:
        """fsync the file, then ``close`` it; returns its MD5."""
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise classify_os_error(exc, self.name) from None
        return self.close()

    def close(self) -> str:
        """Close the file; returns its MD5."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError as exc:
                raise classify_os_error(exc, self.name) from None
        return self._md5.hexdigest()

    def abandon(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def dicom_ids(self) -> tuple[str, str, str]:
        """(series, SOP instance, SOP class) UIDs; ``IntegrityError`` if it is not DICOM."""
        head = b"".join(self._head)
        found = header_ids(head, complete=len(head) == self.size) if head else None  # the fast walk, without a Path
        return found if found is not None else dicom_ids_by_pydicom(self.path)   # pydicom's verdict stands


@dataclass
class _Arrived:
    """A DICOM entry written to staging, with its verdict, checked against the rest at close."""

    entry: str                    # the name in the ZIP
    bare: str                     # its last part (as md5hashes.csv names it)
    name: str                     # the file name in staging
    size: int
    md5: str
    ids: tuple[str, str, str] | None
    not_dicom: IntegrityError | None


def sink_threads() -> anyio.CapacityLimiter:
    """The limiter of the sinks' worker threads in the running event loop (one per loop, as
    anyio's own default limiter), of ``SINK_THREADS`` tokens. A token is held only while a batch
    is handled in its thread, which never waits on the loop: no sink waits for another."""
    try:
        return _SINK_LIMITER.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(SINK_THREADS)
        _SINK_LIMITER.set(limiter)
        return limiter


def _remove(staging: Path) -> None:
    if staging.is_symlink():
        return  # never ours: we create staging as a real folder
    shutil.rmtree(staging, ignore_errors=True)


class _Batched:
    """The async face shared by the sinks: chunks are gathered into batches of ``batch_bytes``
    and each batch is handled by ``_write_batch`` in a worker thread, so file I/O, inflating
    and hashing stay off the event loop and the loop pays one thread hop per batch."""

    staging: Path

    def __init__(self, batch_bytes: int) -> None:
        self._batch: list[bytes] = []
        self._batched = 0
        self._batch_bytes = batch_bytes
        self._dead = False
        self._fed = False
        self._staged = False   # the staging folder was made by this sink (and is removed with it)

    async def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the series; raises as the sink's docstring says."""
        self._batch.append(chunk)
        self._batched += len(chunk)
        if self._batched >= self._batch_bytes:
            await self.flush()

    async def flush(self) -> None:
        batch, self._batch, self._batched = self._batch, [], 0
        if batch:
            await anyio.to_thread.run_sync(self._guarded, self._write, batch, limiter=sink_threads())

    def _write(self, batch: Sequence[bytes]) -> None:
        """One hop's work (in a worker thread: a mkdir on a busy disk takes milliseconds, which
        the event loop, every other download, must not wait for; not abandoned on cancel, so
        ``_staged`` is set before a caller's ``discard`` looks at it)."""
        if not self._fed:
            self._fed = True
            self._first_bytes()
        self._write_batch(batch)

    def _guarded(self, step: object, *args: object) -> object:
        """Run ``step``; on any exception the sink dies and removes its staging folder."""
        if self._dead:
            raise RuntimeError("the sink already failed or was closed")
        try:
            return step(*args)  # type: ignore[operator]
        except BaseException:
            self.discard()
            raise

    async def close(self) -> object:
        """The verdict, once the whole stream was fed; raises as the sink's docstring says.
        The last batch and the verdict take one thread hop together."""
        batch, self._batch, self._batched = self._batch, [], 0
        return await anyio.to_thread.run_sync(self._guarded, self._write_and_finish, batch, limiter=sink_threads())

    def _write_and_finish(self, batch: Sequence[bytes]) -> object:
        if batch:
            self._write(batch)
        return self._finish()

    def write(self, chunk: bytes) -> None:
        """Blocking ``feed`` (no batching), from a thread of one's own."""
        self._guarded(self._write_batch, [chunk])

    def finish(self) -> object:
        """Blocking ``close``."""
        return self._guarded(self._finish)

    def _write_batch(self, batch: Sequence[bytes]) -> None:
        raise NotImplementedError

    def _finish(self) -> object:
        raise NotImplementedError

    def _first_bytes(self) -> None:
        """Called (in a worker thread) before the first batch is written."""

    def discard(self) -> None:
        """Give up: close what is open and remove the staging folder if this sink made it
        (blocking, quick)."""
        self._dead = True
        self._abandon()
        if self._staged:
            _remove(self.staging)

    def _abandon(self) -> None:
        pass


def _feed_zip(sink: Any, batch: Sequence[bytes], central: Callable[[Any], None], what: str) -> None:
    """Feed ``batch`` through ``sink._reader`` (a streaming ZIP reader) and hand each of its events
    to the sink (``_data``, ``_start``, ``_end``; a central-directory record to ``central``);
    raises the sink's IntegrityError, naming ``what``, for bytes that are not a readable ZIP."""
    for chunk in batch:
        try:
            for kind, payload in sink._reader.feed(chunk):
                if kind == "data":
                    sink._data(payload)
                elif kind == "entry":
                    sink._start(payload)
                elif kind == "end":
                    sink._end()
                elif kind == "central":
                    central(payload)
        except ZipStreamError as exc:
            raise sink._error(IntegrityError, f"{what} is not a readable ZIP: {exc}") from None


class ZipSeriesSink(_Batched):
    """An NBIA series ZIP, streamed into ``staging`` (created on the first file; its parent must
    exist). See the module docstring for what it checks and raises.

    Use: ``await sink.feed(chunk)`` for each chunk received, then ``await sink.close()`` for the
    ``UnpackedSeries`` (up to ``max_repairs`` files that failed only their MD5 come back as
    ``repairs``, as from ``verify_and_unpack``). The blocking ``write``/``finish`` do the same
    from a thread of one's own.
    """

    def __init__(self, staging: Path, *, series_uid: str, image_count: int | None, file_size: int | None,
                 limits: Limits, max_repairs: int = 0, batch_bytes: int = BATCH_BYTES) -> None:
        super().__init__(batch_bytes)
        self.staging = staging
        self.series_uid = series_uid
        self.image_count, self.file_size = image_count, file_size
        self.limits = limits
        self.max_repairs = max_repairs
        self._budget = None if file_size is None else \
            int(file_size * (1 + limits.max_series_overhead)) + limits.series_slack_bytes
        self._reader = ZipStreamReader()
        self._entries = 0
        self._names: set[str] = set()
        self._total = 0               # uncompressed bytes of every entry so far
        self._entry: LocalEntry | None = None
        self._entry_size = 0
        self._file: _InstanceFile | None = None
        self._small: bytearray | None = None   # LICENSE or md5hashes.csv being read
        self._small_kind = ""
        self._bare = ""
        self._smalls: dict[str, bytes] = {}
        self._arrived: list[_Arrived] = []

    async def close(self) -> UnpackedSeries:
        """The verified series, once the whole ZIP was fed; raises as the module docstring says."""
        return await super().close()  # type: ignore[return-value]

    def finish(self) -> UnpackedSeries:
        """Blocking ``close``."""
        return super().finish()  # type: ignore[return-value]

    # ------------------------------------------------------------ the stream

    def _first_bytes(self) -> None:
        # The staging folder exists from the first batch on (one mkdir, in the same thread hop):
        # a download in progress shows on disk, and a kill -9 leaves a folder the next run's
        # open cleans, never a file under a final name.
        if not self._staged:
            self._make_staging()

    def _error(self, kind: type[HarvesterError], message: str, **extra: str) -> HarvesterError:
        return kind(message, series_uid=self.series_uid, **extra)  # type: ignore[call-arg]

    def _write_batch(self, batch: Sequence[bytes]) -> None:
        _feed_zip(self, batch, self._central, "download")

    def _start(self, entry: LocalEntry) -> None:
        self._entries += 1
        if self._entries > self.limits.max_entries:
            raise self._error(UnsafeArchiveError, too_many_entries(None, self.limits.max_entries),
                              hint=TOO_MANY_ENTRIES_HINT)
        self._entry, self._entry_size = entry, 0
        if not entry.name or "\x00" in entry.name:
            # nothing that could be written: refused by name at the central directory
            # (check_entry_name), or as a broken ZIP if the stream breaks first, as zipfile does
            return
        check_entry_name(entry.name)
        if entry.name.endswith("/"):  # a folder: nothing to write (zipfile's is_dir)
            return
        if entry.encrypted:
            raise self._error(UnsafeArchiveError, f"ZIP entry {entry.name!r} is encrypted")
        base = _entry_filename(entry.name)
        if name_key(base) in self._names:  # the same rule as for folders: one file on macOS or Windows
            raise self._error(UnsafeArchiveError, f"ZIP repeats the entry name {base!r}")
        self._names.add(name_key(base))
        if entry.declared_size is not None:
            self._check_size(entry.declared_size, entry.declared_size, declared=True)
        self._bare = bare = entry.name if "/" not in entry.name and "\\" not in entry.name else \
            PurePosixPath(entry.name.replace("\\", "/")).name
        if bare in _SMALL_CAPS:
            self._small, self._small_kind = bytearray(), bare
            return
        if not self._staged:
            self._make_staging()
        self._file = _InstanceFile(self.staging, base)

    def _make_staging(self) -> None:
        try:
            self.staging.mkdir(parents=True, exist_ok=False)
        except OSError as exc:
            raise classify_os_error(exc, f"staging folder {self.staging.name}") from None
        self._staged = True

    def _check_size(self, entry_size: int, total: int, *, declared: bool = False) -> None:
        assert self._entry is not None
        if entry_size > self.limits.max_entry_bytes:
            size = f"{entry_size} bytes" if declared else f"more than {self.limits.max_entry_bytes} bytes"
            raise self._error(UnsafeArchiveError, f"ZIP entry {self._entry.name!r} expands to {size} "
                                                  f"(limit {self.limits.max_entry_bytes} per entry; zip bomb?)")
        if self._budget is not None and total > self._budget:
            raise self._error(UnsafeArchiveError, f"ZIP expands beyond the series' announced size ({self.file_size} "
                                                  "bytes): a zip bomb, or the archive's figures are wrong")

    def _data(self, data: bytes | memoryview) -> None:
        assert self._entry is not None
        self._entry_size += len(data)
        self._total += len(data)
        self._check_size(self._entry_size, self._total)
        if self._file is not None:
            self._file.write(data)
        elif self._small is not None:
            if self._entry_size > _SMALL_CAPS[self._small_kind]:
                raise self._error(UnsafeArchiveError, f"ZIP entry {self._entry.name!r} is implausibly large "
                                                      f"(more than {_SMALL_CAPS[self._small_kind]} bytes)")
            self._small += data

    def _end(self) -> None:
        assert self._entry is not None
        entry, self._entry = self._entry, None
        if self._small is not None:
            self._smalls[self._small_kind], self._small = bytes(self._small), None
            return
        file, self._file = self._file, None
        if file is None:
            return  # a folder
        digest = file.close()
        ids, not_dicom = None, None
        try:
            ids = file.dicom_ids()
        except IntegrityError as exc:
            not_dicom = exc
        self._arrived.append(_Arrived(entry.name, self._bare, file.name, file.size, digest, ids, not_dicom))

    def _central(self, record: CentralRecord) -> None:
        check_entry_name(record.name)
        if stat.S_ISLNK((record.external_attr >> 16) & 0xFFFF):
            raise self._error(UnsafeArchiveError, f"ZIP entry {record.name!r} is a symbolic link")

    def _abandon(self) -> None:
        if self._file is not None:
            self._file.abandon()
            self._file = None

    # ------------------------------------------------------------ the verdict

    def _finish(self) -> UnpackedSeries:
        try:
            self._reader.close()
        except ZipStreamError as exc:
            raise self._error(IntegrityError, f"download is not a readable ZIP: {exc}") from None
        self._dead = True  # whatever follows, nothing more is fed
        arrived = self._arrived
        count, announced = len(arrived), sum(a.size for a in arrived)
        # more files or bytes than announced is not a truncated download but another answer
        if self.image_count is not None and count > self.image_count:
            raise self._error(IntegrityError, _not_announced(f"{count} files", f"{self.image_count}"),
                              hint=_MORE_THAN_ANNOUNCED)
        if self.image_count is not None and count != self.image_count:
            raise self._error(IncompleteSeriesError, f"ZIP holds {count} of {self.image_count} files")
        if self.file_size is not None and announced > self.file_size:
            raise self._error(IntegrityError, _not_announced(f"{announced} bytes", f"{self.file_size}"),
                              hint=_MORE_THAN_ANNOUNCED)
        if self.file_size is not None and announced != self.file_size:
            raise self._error(IncompleteSeriesError, f"ZIP holds {announced} of {self.file_size} bytes")
        if MD5_NAME not in self._smalls:
            raise self._error(IntegrityError, "ZIP has no md5hashes.csv, so its files cannot be verified")
        expected = parse_md5_csv(self._smalls[MD5_NAME])
        license_raw = self._smalls.get(LICENSE_NAME)
        files: list[VerifiedFile] = []
        repairs: list[Repair] = []
        sops: set[str] = set()
        for a in arrived:
            base = a.bare
            want = expected.get(base, expected.get(a.entry))
            if want is None:
                raise self._error(IntegrityError, f"{base} is not listed in md5hashes.csv")
            md5_checked = want != ""  # empty: no MD5 recorded; the reader checked the CRC-32
            mismatch = md5_checked and a.md5 != want
            if mismatch and len(repairs) >= self.max_repairs:
                raise self._error(IntegrityError, f"{base} does not match its MD5 (got {a.md5}, expected {want})")
            if a.not_dicom is not None or a.ids is None:
                raise a.not_dicom or self._error(IntegrityError, f"{base} is not DICOM")
            series, sop, sop_class = a.ids
            digest = a.md5
            if mismatch:
                if series != self.series_uid or not sop:
                    raise self._error(IntegrityError, f"{base} does not match its MD5 and cannot be repaired alone")
                repairs.append(Repair(name=a.name, sop_uid=sop, md5=want))
                digest = want
            if series != self.series_uid:
                raise self._error(IntegrityError, f"{base} belongs to series {series or '(none)'}, not this one")
            if sop in sops:
                raise self._error(IntegrityError, f"{base} repeats SOPInstanceUID {sop}")
            sops.add(sop)
            files.append(VerifiedFile(name=a.name, size=a.size, md5=digest, sop_uid=sop, sop_class_uid=sop_class,
                                      md5_checked=md5_checked))
        license_text = None if license_raw is None else license_raw.decode("utf-8", "replace")
        if not self._staged:  # a series of no files (none announced): its folder, empty
            self._make_staging()
        return UnpackedSeries(files=files, license_text=license_text, repairs=repairs)


class AnnotationZipSink(_Batched):
    """The annotation files of a getDCMImage ZIP (``harvester.annotations``), streamed into
    ``staging``, the folder of the series' verified DICOM files (``taken``: their names). The
    series' own entries are read through (inflated, CRC-32 and the directory checked, as every
    ZIP this reader takes) and dropped: getImage gave them. Each ``.xml`` entry is held in memory
    (at most ``MAX_ANNOTATION_BYTES``), checked as one XML document without a DTD and written
    (``O_EXCL``, never through a link). ``close()`` returns the ``AnnotationFile``s in ZIP order.

    Raises ``UnsafeArchiveError`` for an entry name that is absolute or climbs out (any entry,
    local header or central directory), an annotation name that is not a bare safe file name or
    repeats one (``taken`` included, case-folded), more than ``MAX_ANNOTATIONS`` annotations, an
    encrypted or too large one, more entries than ``limits.max_entries`` allows beside them, an
    entry past ``limits.max_entry_bytes`` or the series' own entries past its announced size
    plus the margin (a zip bomb); ``IntegrityError`` for bytes that are not a ZIP this reader can
    vouch for (``zipread``) and an annotation that is not well-formed XML; the disk's errors.
    ``staging`` is the caller's (it removes it on failure); a sink that raised or was discarded
    has removed the annotation files it wrote, so the next attempt starts clean.
    """

    def __init__(self, staging: Path, *, series_uid: str, taken: Sequence[str], file_size: int | None,
                 limits: Limits, batch_bytes: int = BATCH_BYTES) -> None:
        super().__init__(batch_bytes)
        self.staging = staging
        self.series_uid = series_uid
        self.limits = limits
        self._budget = None if file_size is None else \
            int(file_size * (1 + limits.max_series_overhead)) + limits.series_slack_bytes
        self._reader = ZipStreamReader()
        self._used = {name.casefold() for name in taken}
        self._entries = 0
        self._total = 0                       # bytes of the entries that are not annotations
        self._entry: LocalEntry | None = None
        self._entry_size = 0
        self._xml: bytearray | None = None    # the annotation being read
        self._name = ""
        self._written: list[Path] = []
        self.files: list[AnnotationFile] = []

    def _error(self, kind: type[HarvesterError], message: str) -> HarvesterError:
        return kind(message, series_uid=self.series_uid)  # type: ignore[call-arg]

    def _write_batch(self, batch: Sequence[bytes]) -> None:
        _feed_zip(self, batch, lambda entry: check_entry_name(entry.name), "the annotated download")

    def _start(self, entry: LocalEntry) -> None:
        self._entry, self._entry_size, self._xml = entry, 0, None
        check_entry_name(entry.name)
        if not entry.name.lower().endswith(ANNOTATION_SUFFIX):
            self._entries += 1   # a DICOM file, LICENSE or md5hashes.csv: bounded as the series' ZIP
            if self._entries > self.limits.max_entries:
                raise self._error(UnsafeArchiveError, too_many_entries(None, self.limits.max_entries))
            return
        name = annotation_name(entry.name, self.series_uid)
        if name.casefold() in self._used:
            raise self._error(UnsafeArchiveError, f"annotation {name!r} repeats a file name of the series")
        if len(self.files) >= MAX_ANNOTATIONS:
            raise self._error(UnsafeArchiveError, f"more than {MAX_ANNOTATIONS} annotation files")
        if entry.encrypted:
            raise self._error(UnsafeArchiveError, f"annotation {name!r} is encrypted")
        if entry.declared_size is not None and entry.declared_size > MAX_ANNOTATION_BYTES:
            raise self._error(UnsafeArchiveError, f"annotation {name!r} is larger than {MAX_ANNOTATION_BYTES} bytes")
        self._used.add(name.casefold())
        self._xml, self._name = bytearray(), name

    def _data(self, data: bytes | memoryview) -> None:
        assert self._entry is not None
        self._entry_size += len(data)
        if self._xml is not None:
            if self._entry_size > MAX_ANNOTATION_BYTES:
                raise self._error(UnsafeArchiveError,
                                  f"annotation {self._name!r} expands past {MAX_ANNOTATION_BYTES} bytes")
            self._xml += data
            return
        self._total += len(data)
        if self._entry_size > self.limits.max_entry_bytes:
            raise self._error(UnsafeArchiveError, f"ZIP entry {self._entry.name!r} expands to more than "
                                                  f"{self.limits.max_entry_bytes} bytes (zip bomb?)")
        if self._budget is not None and self._total > self._budget:
            raise self._error(UnsafeArchiveError, "the annotated download expands beyond the series' announced "
                                                  "size: a zip bomb, or the archive's figures are wrong")

    def _end(self) -> None:
        xml, self._xml, self._entry = self._xml, None, None
        if xml is None:
            return
        data, name = bytes(xml), self._name
        check_xml(data, name, self.series_uid)
        target = self.staging / name
        try:
            fd = os.open(target, _OPEN_FLAGS, 0o644)
        except OSError as exc:
            raise classify_os_error(exc, name) from None
        self._written.append(target)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            raise classify_os_error(exc, name) from None
        finally:
            os.close(fd)
        self.files.append(AnnotationFile(name=name, size=len(data), md5=hashlib.md5(data).hexdigest()))

    def _finish(self) -> list[AnnotationFile]:
        try:
            self._reader.close()
        except ZipStreamError as exc:
            raise self._error(IntegrityError, f"the annotated download is not a readable ZIP: {exc}") from None
        self._dead = True
        return list(self.files)

    async def close(self) -> list[AnnotationFile]:
        """The annotation files, once the whole ZIP was fed; raises as the class docstring says."""
        return await super().close()  # type: ignore[return-value]

    def finish(self) -> list[AnnotationFile]:
        """Blocking ``close``."""
        return super().finish()  # type: ignore[return-value]

    def _abandon(self) -> None:
        for path in self._written:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
        self._written.clear()


class InstanceSink:
    """Instances that arrive one by one (DICOMweb multipart parts), each written to a new file
    in ``staging`` (created, or emptied, by the caller) while hashed, then checked as DICOM of
    ``series_uid`` and renamed to ``<SOPInstanceUID>.dcm``. Blocking: call it from a worker
    thread; instances come one after another, so no lock is needed.

    Raises ``IntegrityError`` for more than ``max_instances``, an instance past
    ``max_instance_bytes``, one that is not DICOM, of another series, without or repeating a
    SOPInstanceUID (or whose file name clashes with another's), and the disk's errors
    (``classify_os_error``). ``what`` names an instance in messages (``WADO-RS part``),
    ``sender`` what sent it (``WADO-RS``).
    """

    def __init__(self, staging: Path, *, series_uid: str, max_instance_bytes: int, max_instances: int,
                 what: str = "instance", sender: str = "the archive") -> None:
        self.staging = staging
        self.sender = sender
        self.series_uid = series_uid
        self.max_instance_bytes = max_instance_bytes
        self.max_instances = max_instances
        self.what = what
        self.files: list[VerifiedFile] = []
        self._sops: set[str] = set()
        self._names: set[str] = set()
        self._count = 0
        self._file: _InstanceFile | None = None

    def _error(self, message: str) -> IntegrityError:
        return IntegrityError(message, series_uid=self.series_uid)

    @property
    def count(self) -> int:
        """Instances started so far (the current one included)."""
        return self._count

    def start(self) -> None:
        self._count += 1
        if self._count > self.max_instances:
            raise self._error(f"{self.sender} sent more than the {self.max_instances} instances announced")
        self._file = _InstanceFile(self.staging, f"{self._count:08d}.part")

    def write(self, data: bytes | memoryview) -> None:
        assert self._file is not None
        if self._file.size + len(data) > self.max_instance_bytes:
            raise self._error(f"{self.what} {self._count} is larger than {self.max_instance_bytes} bytes")
        self._file.write(data)

    def end(self) -> VerifiedFile:
        assert self._file is not None
        file, self._file = self._file, None
        digest = file.close()
        try:
            series, sop, sop_class = file.dicom_ids()
        except IntegrityError as exc:
            raise self._error(f"{self.what} {self._count}: {exc}") from None
        if series != self.series_uid:
            raise self._error(f"{self.what} {self._count} belongs to series {series or '(none)'}, not this one")
        if not sop:
            raise self._error(f"{self.what} {self._count} has no SOPInstanceUID")
        if sop in self._sops:
            raise self._error(f"{self.what} {self._count} repeats SOPInstanceUID {sop}")
        name = safe_component(sop, max_bytes=100) + ".dcm"
        if name_key(name) in self._names:  # two UIDs sanitised (or case-folded) alike: never overwrite a verified file
            raise self._error(f"{self.what} {self._count}: SOPInstanceUID {sop!r} clashes with another's file name")
        self._sops.add(sop)
        self._names.add(name_key(name))
        try:
            os.replace(file.path, self.staging / name)
        except OSError as exc:
            raise classify_os_error(exc, name) from None
        verified = VerifiedFile(name=name, size=file.size, md5=digest, sop_uid=sop, sop_class_uid=sop_class)
        self.files.append(verified)
        return verified

    def abort(self) -> None:
        """Close an instance left open by an error (its file goes with ``staging``)."""
        if self._file is not None:
            self._file.abandon()
            self._file = None


class StoreSinks:
    """The sinks the engine hands a source (``harvester.source.base.Sinks``): one per attempt at a
    series, each bounded by ``limits`` and writing in batches of ``batch_bytes``."""

    def __init__(self, limits: Limits, batch_bytes: int = BATCH_BYTES, *, resume_root: Path | None = None) -> None:
        self.limits = limits
        self.batch_bytes = batch_bytes
        #: where ``parallel_instances`` keeps the verified instances of a series not yet committed
        #: (``DIR/.harvester/instances``: outside ``tmp/``, which every run empties)
        self.resume_root = resume_root

    def series_zip(self, task: SeriesTask, staging: Path, *, max_repairs: int) -> ZipSeriesSink:
        return ZipSeriesSink(staging, series_uid=task.series_uid, image_count=task.image_count,
                             file_size=task.file_size, limits=self.limits, max_repairs=max_repairs,
                             batch_bytes=self.batch_bytes)

    def annotations_zip(self, task: SeriesTask, staging: Path, *, taken: Sequence[str]) -> AnnotationZipSink:
        return AnnotationZipSink(staging, series_uid=task.series_uid, taken=taken, file_size=task.file_size,
                                 limits=self.limits, batch_bytes=self.batch_bytes)

    def instances(self, task: SeriesTask, staging: Path, *, max_instances: int, what: str = "instance",
                  sender: str = "the archive") -> InstanceSink:
        return InstanceSink(staging, series_uid=task.series_uid, max_instance_bytes=self.limits.max_entry_bytes,
                            max_instances=max_instances, what=what, sender=sender)

    def parallel_instances(self, task: SeriesTask, staging: Path, *, names: dict[str, str]) -> ParallelInstanceSink:
        """A thread-safe writer of ``task``'s instances fetched one by one, several at once, that
        keeps the verified ones for the next attempt (see ``ParallelInstanceSink``); without a
        ``resume_root`` they are kept beside ``staging`` for this attempt only."""
        resume = (resume_folder(self.resume_root, task.series_uid) if self.resume_root is not None
                  else staging.with_name(staging.name + ".instances"))
        return ParallelInstanceSink(staging, resume, series_uid=task.series_uid, names=names,
                                    image_count=task.image_count, file_size=task.file_size,
                                    max_instance_bytes=self.limits.max_entry_bytes)

    def repair_file(self, folder: Path, name: str) -> RepairFile:
        return RepairFile(folder, name)


#: the record of the verified instances of a series fetched one by one (one JSON line each)
RESUME_JOURNAL = "verified.jsonl"
_MD5_HEX = re.compile(r"^[0-9a-f]{32}$")


class ParallelInstanceSink:
    """Instances of one series that arrive whole and several at once (NBIA's getSingleImage),
    each checked and kept in a resume folder that outlives a failed attempt, a Ctrl-C or a
    kill -9; ``finish`` checks the series as the ZIP path does and moves its files into
    ``staging`` for the engine to commit. Blocking and thread-safe: call it from worker threads.

    ``names`` maps each SOPInstanceUID the archive listed to the ZIP entry name the series ZIP
    would give it, so a tree is the same whichever path fetched it.

    Invariant of the resume folder: a file is named there only once its bytes were fsynced and
    checked, and a line of ``verified.jsonl`` (appended and fsynced after the rename) records
    (SOP, name, size, MD5). ``staged`` trusts a recorded file only after checking it again
    (size, MD5 against the archive's or the recorded one, DICOM series and SOP).

    Who raises what: ``write`` raises ``IntegrityError`` for an instance that was not listed,
    is larger than ``max_instance_bytes``, does not match the archive's MD5, is not DICOM, is
    of another series or is another instance; ``finish`` raises ``IntegrityError`` for more
    files or bytes than announced and ``IncompleteSeriesError`` for fewer; both raise the disk's
    errors (``classify_os_error``).
    """

    def __init__(self, staging: Path, resume: Path, *, series_uid: str, names: dict[str, str],
                 image_count: int | None, file_size: int | None, max_instance_bytes: int) -> None:
        self.staging, self.resume = staging, resume
        self.series_uid = series_uid
        self.image_count, self.file_size = image_count, file_size
        self.max_instance_bytes = max_instance_bytes
        self._names = {sop: instance_filename(entry) for sop, entry in names.items()}
        if len({name_key(n) for n in self._names.values()}) != len(self._names):
            raise IntegrityError("two instances of the series would get the same file name", series_uid=series_uid)
        self._lock = threading.Lock()
        self._verified: dict[str, VerifiedFile] = {}
        self._recorded = self._read_journal()

    def _error(self, message: str) -> IntegrityError:
        return IntegrityError(message, series_uid=self.series_uid)

    # ------------------------------------------------------------ the resume folder

    def _read_journal(self) -> dict[str, tuple[str, int, str]]:
        """SOP -> (name, size, md5) of each instance a previous attempt recorded; lines that are
        torn (a kill mid-append), malformed or name another file than the SOP's are ignored."""
        for folder in (self.resume.parent, self.resume):  # its root too: nothing written through a link
            if folder.is_symlink():
                raise OutputNotWritableError(f"the resume folder {folder.name} is a symbolic link",
                                             hint="remove it (or put a real folder there) and rerun")
        try:
            self.resume.mkdir(parents=True, exist_ok=True)
            for child in self.resume.iterdir():   # instances a kill -9 cut off while written
                if child.name.startswith(".") and child.name.endswith(".part"):
                    child.unlink(missing_ok=True)
            raw = (self.resume / RESUME_JOURNAL).read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise classify_os_error(exc, f"resume folder {self.resume.name}") from None
        recorded: dict[str, tuple[str, int, str]] = {}
        for line in raw.splitlines():
            try:
                item = json.loads(line)
                sop, name, size, md5 = item["sop"], item["name"], item["size"], item["md5"]
            except (ValueError, TypeError, KeyError):
                continue
            if (isinstance(sop, str) and self._names.get(sop) == name and type(size) is int
                    and isinstance(md5, str) and _MD5_HEX.match(md5)):
                recorded[sop] = (name, size, md5)
        return recorded

    def staged(self, sop_uid: str, archive_md5: str) -> VerifiedFile | None:
        """The instance a previous attempt verified, checked again; None (its file removed)
        when there is none or it fails a check. ``archive_md5``: the archive's, or ``""``."""
        found = self._recorded.get(sop_uid)
        if found is None:
            return None
        name, size, md5 = found
        path = self.resume / name
        try:
            with open(path, "rb", opener=_no_follow) as fh:
                digest = hashlib.md5()
                head = fh.read(_HEAD_BYTES)
                total = len(head)
                digest.update(head)
                while chunk := fh.read(1 << 20):
                    total += len(chunk)
                    digest.update(chunk)
            ids = read_dicom_ids(path, head, whole=total == len(head))
        except (OSError, IntegrityError):
            ids, total, digest = None, -1, hashlib.md5()
        if (ids is None or total != size or digest.hexdigest() != (archive_md5 or md5)
                or ids[0] != self.series_uid or ids[1] != sop_uid):
            path.unlink(missing_ok=True)
            return None
        verified = VerifiedFile(name=name, size=size, md5=md5, sop_uid=sop_uid, sop_class_uid=ids[2],
                                md5_checked=bool(archive_md5))
        with self._lock:
            self._verified[sop_uid] = verified
        return verified

    def open(self, sop_uid: str) -> "InstanceUpload":
        """A new file for instance ``sop_uid``'s bytes as they arrive (``InstanceUpload``): raises
        ``IntegrityError`` for an instance the archive did not list."""
        name = self._names.get(sop_uid)
        if name is None:
            raise self._error(f"instance {sop_uid} is not one the archive listed for the series")
        return InstanceUpload(self, sop_uid, name)

    def write(self, sop_uid: str, data: bytes, archive_md5: str) -> VerifiedFile:
        """Check instance ``sop_uid``'s bytes, held whole, and keep them (``open``, then the
        upload's ``write`` and ``commit``); raises as the class docstring says."""
        upload = self.open(sop_uid)
        try:
            upload.write(data)
            return upload.commit(archive_md5)
        except BaseException:
            upload.abandon()
            raise

    def _keep(self, upload: "InstanceUpload", digest: str, archive_md5: str, sop_class: str) -> VerifiedFile:
        verified = VerifiedFile(name=upload.name, size=upload.size, md5=digest, sop_uid=upload.sop_uid,
                                sop_class_uid=sop_class, md5_checked=bool(archive_md5))
        line = json.dumps({"sop": upload.sop_uid, "name": upload.name, "size": upload.size, "md5": digest}) + "\n"
        with self._lock:
            self._verified[upload.sop_uid] = verified
            try:
                with open(self.resume / RESUME_JOURNAL, "ab", opener=_no_follow_append) as fh:
                    fh.write(line.encode("utf-8"))
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:
                raise classify_os_error(exc, RESUME_JOURNAL) from None
        return verified

    def finish(self) -> UnpackedSeries:
        """The verified series, its files moved into ``staging`` (created here), once every
        listed instance was written or staged; raises as the class docstring says. The resume
        folder goes once its files are in ``staging``."""
        files = sorted(self._verified.values(), key=lambda f: f.name)
        count, total = len(files), sum(f.size for f in files)
        if self.image_count is not None and count > self.image_count:
            raise self._error(_not_announced(f"{count} files", f"{self.image_count}"))
        if count != len(self._names) or (self.image_count is not None and count != self.image_count):
            raise IncompleteSeriesError(f"{count} of {self.image_count or len(self._names)} instances arrived",
                                        series_uid=self.series_uid)
        if self.file_size is not None and total > self.file_size:
            raise self._error(_not_announced(f"{total} bytes", f"{self.file_size}"))
        if self.file_size is not None and total != self.file_size:
            raise IncompleteSeriesError(f"the instances hold {total} of {self.file_size} bytes",
                                        series_uid=self.series_uid)
        try:
            self.staging.mkdir(parents=True, exist_ok=False)
            for f in files:
                os.replace(self.resume / f.name, self.staging / f.name)
        except OSError as exc:
            raise classify_os_error(exc, f"staging folder {self.staging.name}") from None
        _remove(self.resume)
        return UnpackedSeries(files=files, license_text=None, repairs=[])


class InstanceUpload:
    """One instance of a ``ParallelInstanceSink`` as its bytes arrive: ``write`` each piece
    (hashed and written at once into a ``.part`` file of the resume folder, so an instance is
    never held in memory whole, whatever its size), then ``commit`` with the archive's MD5, or
    ``abandon``. Blocking; one thread at a time per upload (uploads of a sink may run at once).

    ``write`` raises ``IntegrityError`` past the sink's ``max_instance_bytes``; ``commit`` raises
    it for an MD5 other than the archive's, bytes that are not DICOM, or of another series or
    instance; both raise the disk's errors. After an error, call ``abandon`` (nothing is kept)."""

    def __init__(self, sink: ParallelInstanceSink, sop_uid: str, name: str) -> None:
        self.sink, self.sop_uid, self.name = sink, sop_uid, name
        part = sink.resume / f".{name}.part"
        part.unlink(missing_ok=True)   # an earlier attempt's, abandoned by a kill
        self._file = _InstanceFile(sink.resume, part.name)

    @property
    def size(self) -> int:
        return self._file.size

    def write(self, data: bytes | memoryview) -> None:
        if self._file.size + len(data) > self.sink.max_instance_bytes:
            raise self.sink._error(f"instance {self.sop_uid} is larger than {self.sink.max_instance_bytes} bytes")
        self._file.write(data)

    def write_all(self, pieces: Sequence[bytes]) -> None:
        for piece in pieces:
            self.write(piece)

    def commit(self, archive_md5: str) -> VerifiedFile:
        """Check the instance (``archive_md5``: the archive's MD5, or ``""`` when it has none:
        then count, size and DICOM only, as the ZIP path), fsync it, name it in the resume
        folder and record it in the journal."""
        sop_uid, file, error = self.sop_uid, self._file, self.sink._error
        digest = file.sync_and_close()
        if archive_md5 and digest != archive_md5:
            raise error(f"instance {sop_uid} does not match its MD5 (got {digest}, expected {archive_md5})")
        try:
            series, sop, sop_class = file.dicom_ids()
        except IntegrityError as exc:
            raise error(f"instance {sop_uid}: {exc}") from None
        if series != self.sink.series_uid:
            raise error(f"instance {sop_uid} belongs to series {series or '(none)'}, not this one")
        if sop != sop_uid:
            raise error(f"the archive sent instance {sop or '(none)'} for {sop_uid}")
        try:
            os.replace(file.path, self.sink.resume / self.name)
        except OSError as exc:
            raise classify_os_error(exc, self.name) from None
        return self.sink._keep(self, digest, archive_md5, sop_class)

    def abandon(self) -> None:
        """Close and remove the ``.part`` file (quick; safe to call twice, or after ``commit``)."""
        self._file.abandon()
        self._file.path.unlink(missing_ok=True)


class RepairFile:
    """One instance refetched alone (``harvester.source.base.RepairTarget``), poured into a new
    file ``folder/name`` as it arrives (``O_EXCL``, never through a link; an earlier file of
    that name, a kill's leftover, is removed first) and hashed as it is written: ``restart``
    before each attempt, ``write_all`` for each batch, then ``close`` (fsynced; its MD5) or
    ``abandon``. The caller checks it and renames it over the file it repairs. Blocking; raises
    the disk's errors."""

    def __init__(self, folder: Path, name: str) -> None:
        (folder / name).unlink(missing_ok=True)
        self._file = _InstanceFile(folder, name)

    @property
    def path(self) -> Path:
        return self._file.path

    def restart(self) -> None:
        if self._file.size:   # an attempt that failed part-way: start again from an empty file
            self.abandon()
            self._file = _InstanceFile(self._file.folder, self._file.name)

    def write_all(self, pieces: Sequence[bytes]) -> None:
        for piece in pieces:
            self._file.write(piece)

    def close(self) -> str:
        """fsync and close the file; returns its MD5."""
        return self._file.sync_and_close()

    def abandon(self) -> None:
        """Close and remove the file (safe to call twice, or after ``close``)."""
        self._file.abandon()
        self._file.path.unlink(missing_ok=True)


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))


def _no_follow_append(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o644)


def resume_folder(root: Path, series_uid: str) -> Path:
    """The resume folder of one series under ``root`` (UIDs from a server are never path parts)."""
    return root / hashlib.sha1(series_uid.encode("utf-8", "replace")).hexdigest()[:20]


def prune_resume_folders(root: Path, keep: Iterable[str]) -> int:
    """Remove every resume folder under ``root`` but those of the series ``keep`` names (the
    ones a next attempt may continue): a series committed since (by its ZIP, or by another run)
    or no longer in the plan has no use for its kept instances. Only ``root``'s own entries are
    removed, a link as a link (never what it points to). Returns how many; OS errors are ignored
    (the next run tries again)."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return 0
    wanted = {resume_folder(root, uid).name for uid in keep}
    removed = 0
    for entry in entries:
        if entry.name in wanted:
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
        except OSError:
            continue
    return removed
