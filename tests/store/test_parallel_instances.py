"""The store's sink for instances fetched one by one, several at once (``ParallelInstanceSink``):
real DICOM files of the synthetic archive, real files in a real resume folder."""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harvester.errors import IncompleteSeriesError, IntegrityError
from harvester.server.archive import Archive, SeriesRecord
from harvester.store.sink import RESUME_JOURNAL, ParallelInstanceSink
from tests.harvest_helpers import normal_series


@pytest.fixture
def series(small_archive: Archive) -> SeriesRecord:
    """A synthetic series of four instances or more."""
    return next(r for r in map(small_archive.get, normal_series(small_archive)) if len(r.instances) >= 4)


def sink_for(rec: SeriesRecord, tmp_path: Path, **overrides: object) -> ParallelInstanceSink:
    names = {inst.sop_uid: f"1-{i}.dcm" for i, inst in enumerate(rec.instances, 1)}
    args: dict[str, object] = dict(series_uid=rec.uid, names=names, image_count=len(rec.instances),
                                   file_size=rec.total_bytes, max_instance_bytes=1 << 30)
    args.update(overrides)
    return ParallelInstanceSink(tmp_path / "staging", tmp_path / "resume", **args)  # type: ignore[arg-type]


def test_instances_written_from_many_threads_make_the_series(series: SeriesRecord, tmp_path: Path) -> None:
    sink = sink_for(series, tmp_path)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: sink.write(i.sop_uid, i.path.read_bytes(), i.md5), series.instances))
    unpacked = sink.finish()
    assert sorted(f.name for f in unpacked.files) == sorted(f"1-{i}.dcm" for i in range(1, len(series.instances) + 1))
    for i, inst in enumerate(series.instances, 1):
        assert (tmp_path / "staging" / f"1-{i}.dcm").read_bytes() == inst.path.read_bytes()
    assert not (tmp_path / "resume").exists()  # its files are in staging now


def test_a_missing_instance_leaves_the_series_incomplete(series: SeriesRecord, tmp_path: Path) -> None:
    sink = sink_for(series, tmp_path)
    for inst in series.instances[1:]:
        sink.write(inst.sop_uid, inst.path.read_bytes(), inst.md5)
    with pytest.raises(IncompleteSeriesError):
        sink.finish()
    assert not (tmp_path / "staging").exists()


def test_bytes_other_than_announced_are_refused(series: SeriesRecord, tmp_path: Path) -> None:
    sink = sink_for(series, tmp_path, file_size=series.total_bytes - 1)
    for inst in series.instances:
        sink.write(inst.sop_uid, inst.path.read_bytes(), inst.md5)
    with pytest.raises(IntegrityError, match="bytes"):
        sink.finish()


@pytest.mark.parametrize("case", ["md5", "other instance", "not listed", "not dicom", "too large"])
def test_a_bad_instance_is_refused_and_not_kept(series: SeriesRecord, tmp_path: Path, case: str) -> None:
    first, second = series.instances[0], series.instances[1]
    sink = sink_for(series, tmp_path, max_instance_bytes=first.size - 1 if case == "too large" else 1 << 30)
    data, md5, sop = first.path.read_bytes(), first.md5, first.sop_uid
    if case == "md5":
        md5 = hashlib.md5(b"x").hexdigest()
    elif case == "other instance":
        sop = second.sop_uid
        md5 = ""
    elif case == "not listed":
        sop = "1.2.3.4"
    elif case == "not dicom":
        data = b"<html>busy</html>" * 10
        md5 = hashlib.md5(data).hexdigest()
    with pytest.raises(IntegrityError):
        sink.write(sop, data, md5)
    assert [p.name for p in (tmp_path / "resume").iterdir()] == []  # nothing named, nothing recorded


def test_a_rerun_trusts_a_kept_instance_only_after_checking_it(series: SeriesRecord, tmp_path: Path) -> None:
    sink = sink_for(series, tmp_path)
    kept = series.instances[:3]
    for inst in kept:
        sink.write(inst.sop_uid, inst.path.read_bytes(), inst.md5)
    # the next attempt: one kept file damaged (same size), the journal torn by a kill and carrying
    # lines someone wrote to point elsewhere
    damaged = tmp_path / "resume" / "1-2.dcm"
    raw = bytearray(damaged.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    damaged.write_bytes(bytes(raw))
    with open(tmp_path / "resume" / RESUME_JOURNAL, "ab") as fh:
        fh.write(json.dumps({"sop": series.instances[3].sop_uid, "name": "../../evil", "size": 1,
                             "md5": "0" * 32}).encode() + b"\n{\"sop\": \"torn")
    (tmp_path / "resume" / ".1-4.dcm.part").write_bytes(b"half")  # cut off by the kill
    again = sink_for(series, tmp_path)
    assert again.staged(kept[0].sop_uid, kept[0].md5) is not None
    assert again.staged(kept[1].sop_uid, kept[1].md5) is None          # damaged: refetch
    assert not damaged.exists()
    assert again.staged(kept[2].sop_uid, "") is not None               # no archive MD5: the recorded one
    assert again.staged(series.instances[3].sop_uid, series.instances[3].md5) is None  # the hostile line
    for inst in series.instances[1:2] + series.instances[3:]:
        again.write(inst.sop_uid, inst.path.read_bytes(), inst.md5)
    unpacked = again.finish()
    assert len(unpacked.files) == len(series.instances)
    for i, inst in enumerate(series.instances, 1):
        assert (tmp_path / "staging" / f"1-{i}.dcm").read_bytes() == inst.path.read_bytes()


@pytest.mark.parametrize("where", ["root", "series"])
def test_a_resume_folder_through_a_symbolic_link_is_refused(series: SeriesRecord, tmp_path: Path, where: str) -> None:
    from harvester.errors import OutputNotWritableError

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root = tmp_path / "instances"
    names = {inst.sop_uid: f"1-{i}.dcm" for i, inst in enumerate(series.instances, 1)}
    if where == "root":
        root.symlink_to(elsewhere)
    else:
        root.mkdir()
        (root / "s").symlink_to(elsewhere)
    with pytest.raises(OutputNotWritableError, match="symbolic link"):
        ParallelInstanceSink(tmp_path / "staging", root / "s", series_uid=series.uid, names=names,
                             image_count=None, file_size=None, max_instance_bytes=1 << 30)
    assert list(elsewhere.iterdir()) == []


def test_an_instance_streamed_in_pieces_is_kept_as_one_written_whole(series: SeriesRecord, tmp_path: Path) -> None:
    """``open`` then ``write_all`` piece by piece (as getSingleImage's body arrives) keeps the
    same file, size and MD5 as ``write`` of the whole bytes, and the journal records it."""
    sink = sink_for(series, tmp_path)
    for inst in series.instances:
        data = inst.path.read_bytes()
        upload = sink.open(inst.sop_uid)
        upload.write_all([data[i:i + 1000] for i in range(0, len(data), 1000)])
        verified = upload.commit(inst.md5)
        assert (verified.size, verified.md5, verified.sop_uid) == (len(data), inst.md5, inst.sop_uid)
    journal = (tmp_path / "resume" / RESUME_JOURNAL).read_text().splitlines()
    assert sorted(json.loads(line)["sop"] for line in journal) == sorted(i.sop_uid for i in series.instances)
    sink.finish()
    for i, inst in enumerate(series.instances, 1):
        assert (tmp_path / "staging" / f"1-{i}.dcm").read_bytes() == inst.path.read_bytes()


@pytest.mark.parametrize("case", ["too large", "md5", "cut short", "abandoned"])
def test_a_streamed_instance_that_fails_leaves_nothing(series: SeriesRecord, tmp_path: Path, case: str) -> None:
    """Past the size limit while its pieces arrive, an MD5 other than the archive's or a body
    cut short (not DICOM to its end) at ``commit``, or given up (a network error): after
    ``abandon`` the resume folder holds no file and no journal line, and the instance can be
    streamed again."""
    inst = series.instances[0]
    data = inst.path.read_bytes()
    sink = sink_for(series, tmp_path, max_instance_bytes=len(data) - 1 if case == "too large" else 1 << 30)
    upload = sink.open(inst.sop_uid)
    try:
        if case == "too large":
            with pytest.raises(IntegrityError, match="larger than"):
                upload.write_all([data[:len(data) // 2], data[len(data) // 2:]])
        elif case == "md5":
            upload.write_all([data])
            with pytest.raises(IntegrityError, match="MD5"):
                upload.commit(hashlib.md5(b"x").hexdigest())
        elif case == "cut short":
            upload.write_all([data[:200]])
            with pytest.raises(IntegrityError):
                upload.commit("")
        else:
            upload.write_all([data[:len(data) // 2]])
    finally:
        upload.abandon()
    assert [p.name for p in (tmp_path / "resume").iterdir()] == []
    if case != "too large":
        again = sink.open(inst.sop_uid)
        again.write_all([data])
        assert again.commit(inst.md5).md5 == inst.md5
