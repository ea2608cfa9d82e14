"""The synthetic backend: spec parsing, deterministic valid DICOM, the cache, pydicom's samples."""
from __future__ import annotations

import datetime as dt
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harvester.server import synthetic
from harvester.server.archive import Archive
from harvester.server.dicomgen import SOP_CLASSES, PixelGeometry
from harvester.server.synthetic import SyntheticSpec, build_synthetic, collection_name, pydicom_sample_files


def test_parse_full_spec() -> None:
    spec = SyntheticSpec.parse("collections=2,patients=3,studies=2,series=2,instances=5,size=16KiB,"
                               "modalities=CT+MR+PT,seed=7,samples=1,hostile=1,released=2019-01-01..2024-12-31")
    assert (spec.collections, spec.patients, spec.studies, spec.series, spec.instances) == (2, 3, 2, 2, 5)
    assert spec.size == 16 * 1024 and spec.modalities == ("CT", "MR", "PT") and spec.seed == 7
    assert spec.samples and spec.hostile
    assert spec.released == (dt.date(2019, 1, 1), dt.date(2024, 12, 31))
    assert SyntheticSpec.parse("") == SyntheticSpec()


@pytest.mark.parametrize("text,size", [("size=100B", 100), ("size=64KiB", 65536), ("size=5MiB", 5 * 1024**2),
                                       ("size=64KB", 64_000), ("size=2kB", 2000), ("size=4096", 4096)])
def test_parse_sizes(text: str, size: int) -> None:
    assert SyntheticSpec.parse(text).size == size


@pytest.mark.parametrize("text,needle", [
    ("colections=2", "colections"), ("patients=0", "patients"), ("size=3B", "size"), ("size=12XB", "size"),
    ("size=2kb", "2KiB"), ("size=2M", "2MiB"),
    ("modalities=CT+XX", "XX"), ("samples=maybe", "samples"), ("released=2024-01-01..2019-01-01", "released"),
    ("seed", "seed"), ("size=1GB", "rows"),
])
def test_parse_rejects_with_the_key_named(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        SyntheticSpec.parse(text)


specs = st.builds(
    SyntheticSpec,
    collections=st.integers(0, 20), patients=st.integers(1, 50), studies=st.integers(1, 5),
    series=st.integers(1, 9), instances=st.integers(1, 500), size=st.integers(1, 5000).map(lambda n: 2 * n),
    modalities=st.lists(st.sampled_from(sorted(SOP_CLASSES)), min_size=1, max_size=4).map(tuple),
    seed=st.integers(0, 2**32), samples=st.booleans(), hostile=st.booleans(),
    seg=st.booleans(), missing_md5=st.booleans(),
)


@given(specs)
def test_canonical_round_trips(spec: SyntheticSpec) -> None:
    assert SyntheticSpec.parse(spec.canonical()) == spec
    assert SyntheticSpec.parse(spec.canonical()).cache_key() == spec.cache_key()


def test_pixel_geometry() -> None:
    assert PixelGeometry.for_size(64 * 1024) == PixelGeometry(rows=128, columns=256)
    assert PixelGeometry.for_size(5 * 1024**2).columns == 256
    odd = PixelGeometry.for_size(2 * 7 * 11)
    assert odd.rows * odd.columns * 2 == 154 and odd.columns == 77
    with pytest.raises(ValueError):
        PixelGeometry.for_size(5)


def test_collection_names() -> None:
    assert collection_name(0, ("CT", "MR")) == "SYN-LUNG-CT"
    assert collection_name(1, ("CT", "MR")) == "SYN-BRAIN-MR"
    assert collection_name(8, ("CT",)) == "SYN-LUNG-CT-2"


def test_every_file_is_valid_dicom_consistent_with_its_rows(small_archive: Archive) -> None:
    syn = [r for r in small_archive.records() if r.row["Collection"].startswith("SYN-")]
    assert len(syn) == 2 * 2 * 1 * 2
    assert {r.row["Modality"] for r in syn} == {"CT", "MR"}
    for rec in syn:
        row = rec.row
        assert row["ImageCount"] == len(rec.instances) == 4
        assert row["FileSize"] == sum(i.path.stat().st_size for i in rec.instances)
        assert rec.patient["PatientId"] == row["PatientID"] and rec.study["StudyInstanceUID"] == row["StudyInstanceUID"]
        for number, inst in enumerate(rec.instances, start=1):
            data = inst.path.read_bytes()
            assert data[128:132] == b"DICM" and len(data) == inst.size
            assert hashlib.md5(data).hexdigest() == inst.md5
            ds = pydicom.dcmread(inst.path)
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == inst.sop_uid
            assert ds.SOPClassUID == SOP_CLASSES[row["Modality"]] == ds.file_meta.MediaStorageSOPClassUID
            assert ds.SeriesInstanceUID == rec.uid and ds.StudyInstanceUID == row["StudyInstanceUID"]
            assert ds.PatientID == row["PatientID"] and str(ds.PatientName) == row["PatientID"]
            assert ds.Modality == row["Modality"] and ds.BodyPartExamined == row["BodyPartExamined"]
            assert ds.SeriesDescription == row["SeriesDescription"] and ds.StudyDescription == row["StudyDesc"]
            assert ds.Manufacturer == row["Manufacturer"] and int(ds.SeriesNumber) == row["SeriesNumber"]
            assert ds.StudyDate == row["StudyDate"].replace("-", "") and ds.StudyID
            assert ds.InstanceNumber == inst.instance_number == number
            assert ds.Rows * ds.Columns * 2 == 8 * 1024 == len(ds.PixelData) and ds.Columns == 256
    descriptions = {r.row["SeriesDescription"] for r in syn} | {r.row["StudyDesc"] for r in syn}
    assert any("/" in d and " " in d for d in descriptions)


def test_release_dates_spread_over_the_range(small_archive: Archive) -> None:
    days = sorted(dt.date.fromisoformat(r.row["DateReleased"][:10]) for r in small_archive.records())
    assert days[0] == dt.date(2019, 1, 1) and days[-1] == dt.date(2024, 12, 31)
    assert len(set(days)) > len(days) // 3
    for rec in small_archive.records():
        released = rec.row["DateReleased"]
        assert dt.datetime.strptime(released, "%Y-%m-%d %H:%M:%S.0")
        assert dt.datetime.strptime(rec.row["MaxSubmissionTimestamp"], "%Y-%m-%d %H:%M:%S.0") < \
            dt.datetime.strptime(released, "%Y-%m-%d %H:%M:%S.0")


def test_builds_are_byte_identical_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = SyntheticSpec.parse("collections=1,patients=2,series=2,instances=3,size=2KiB,modalities=PT+MR,seed=42")
    first = build_synthetic(spec, tmp_path / "a")
    second = build_synthetic(spec, tmp_path / "b")
    assert list(first.series) == list(second.series)
    for uid, rec in first.series.items():
        other = second.series[uid]
        assert rec.row == other.row
        assert [i.path.read_bytes() for i in rec.instances] == [i.path.read_bytes() for i in other.instances]
    reseeded = build_synthetic(SyntheticSpec.parse("collections=1,patients=2,series=2,instances=3,size=2KiB,"
                                                   "modalities=PT+MR,seed=43"), tmp_path / "a")
    assert not set(reseeded.series) & set(first.series)

    def no_generation(*args: object) -> None:
        raise AssertionError("the second build must only read the index")

    monkeypatch.setattr(synthetic, "_generate", no_generation)
    again = build_synthetic(spec, tmp_path / "a")
    assert list(again.series) == list(first.series)
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".build-")]


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(spec: SyntheticSpec, root: Path) -> None:
        (root / "half.dcm").write_bytes(b"x")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(synthetic, "_generate", broken)
    with pytest.raises(OSError):
        build_synthetic(SyntheticSpec(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_samples_are_pydicoms_files_byte_for_byte(small_archive: Archive) -> None:
    samples = [r for r in small_archive.records() if r.row["Collection"] == "PYDICOM-SAMPLES"]
    originals = {hashlib.md5(path.read_bytes()).hexdigest() for path, _ in pydicom_sample_files()}
    served = {i.md5 for r in samples for i in r.instances}
    assert served == originals
    assert len(served) >= 30  # CT_small.dcm plus the 31 dicomdirtests images with pixel data
    ct_small = pydicom.data.get_testdata_file("CT_small.dcm")
    assert any(i.path.read_bytes() == Path(ct_small).read_bytes() for r in samples for i in r.instances)
    for rec in samples:
        assert rec.row["ImageCount"] == len(rec.instances)
        for inst in rec.instances:
            ds = pydicom.dcmread(inst.path, stop_before_pixels=True)
            assert ds.SeriesInstanceUID == rec.uid and ds.SOPInstanceUID == inst.sop_uid
            assert ds.PatientID == rec.row["PatientID"]
    assert all("DICOMDIR" not in str(i.path) for r in samples for i in r.instances)


PARALLEL_CHECK = """
import os, sys, threading
from harvester.server import synthetic
from harvester.server.synthetic import SyntheticSpec, build_synthetic
spec = SyntheticSpec.parse("collections=3,patients=4,studies=2,series=2,instances=2,size=2KiB,modalities=CT+MR+PT,seed=21")
sequential = build_synthetic(spec, sys.argv[1])
synthetic.PARALLEL_MIN_FILES = 0
assert threading.active_count() == 1 and (os.cpu_count() or 1) >= 2  # so the forked workers really run
parallel = build_synthetic(spec, sys.argv[2])
def view(archive):
    return [(r.row, [(i.sop_uid, i.md5, i.path.read_bytes()) for i in r.instances]) for r in archive.records()]
assert view(sequential) == view(parallel)
print(len(parallel))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs for worker processes")
def test_parallel_build_equals_sequential(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", PARALLEL_CHECK, str(tmp_path / "seq"), str(tmp_path / "par")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(3 * 4 * 2 * 2)


def test_seg_and_missing_md5_extras(tmp_path: Path) -> None:
    import zlib

    spec = SyntheticSpec.parse("collections=1,patients=1,series=1,instances=3,size=2KB,seg=1,missing_md5=1,seed=3")
    plain = SyntheticSpec.parse("collections=1,patients=1,series=1,instances=3,size=2KB,seed=3")
    assert "seg" not in plain.canonical() and "md5" not in plain.canonical()  # old cache keys stand
    first, again = build_synthetic(spec, tmp_path / "a"), build_synthetic(spec, tmp_path / "b")
    (seg,) = [r for r in first.records() if r.row["Modality"] == "SEG"]
    (ct,) = [r for r in first.records() if r.row["Modality"] == "CT"]
    assert seg.row["StudyInstanceUID"] == ct.row["StudyInstanceUID"] and seg.row["ImageCount"] == 2
    for inst, twin in zip(seg.instances, again.get(seg.uid).instances, strict=True):
        data = inst.path.read_bytes()
        assert data == twin.path.read_bytes()  # deterministic
        ds = pydicom.dcmread(inst.path)
        assert ds.Modality == "SEG" and ds.SOPClassUID == synthetic.SEGMENTATION_STORAGE
        assert ds.SeriesInstanceUID == seg.uid and any(ds.PixelData)
        deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
        assert len(data) > 1 << 20 and len(data) > 800 * len(deflater.compress(data) + deflater.flush())
    for rec in (seg, ct):  # the second instance of each SYN series has no MD5 recorded
        assert [i.md5 == "" for i in rec.instances][:3] == [False, True, False][:len(rec.instances)]
