"""Hypothesis mutates a valid series ZIP (flipped bits, cut or inserted bytes, spliced headers):
``verify_and_unpack`` and the streaming sink (``ZipSeriesSink``, fed in chunks) each either accept it with every file matching md5hashes.csv and the right
series, or raises a ``SeriesError`` (integrity, incomplete, unsafe); it never raises anything
else and never writes outside its staging folder."""
from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harvester.config import Limits
from harvester.errors import SeriesError
from harvester.server.zipstream import bytes_entry, zip_stream
from harvester.store.sink import ZipSeriesSink
from harvester.unpack import UnpackedSeries, verify_and_unpack

from .handserver import dicom_series, honest_zip, md5_csv

SERIES = "1.2.826.0.1.3680043.2.1125.3001"


def mutations(data: bytes) -> st.SearchStrategy[bytes]:
    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(buf) - 1))
            kind = draw(st.sampled_from(["flip", "cut", "insert", "truncate", "splice"]))
            if kind == "flip":
                buf[at] ^= 1 << draw(st.integers(0, 7))
            elif kind == "cut":
                del buf[at:at + draw(st.integers(1, 64))]
            elif kind == "insert":
                buf[at:at] = draw(st.binary(min_size=1, max_size=32))
            elif kind == "truncate":
                del buf[at:]
            else:  # copy a run of bytes (often a header) over another place
                start = draw(st.integers(0, len(buf) - 1))
                piece = buf[start:start + draw(st.integers(4, 64))]
                buf[at:at + len(piece)] = piece
            if not buf:
                buf = bytearray(b"PK")
        return bytes(buf)
    return build()


FILES = dicom_series(SERIES, 3, seed="fuzz")
ZIP = honest_zip(FILES)
MD5 = {hashlib.md5(d).hexdigest() for _, d in FILES}


async def _java_zip(files: list[tuple[str, bytes]]) -> bytes:
    entries = [bytes_entry("LICENSE", b"CC BY 4.0\n"), *(bytes_entry(n, d) for n, d in files),
               bytes_entry("md5hashes.csv", md5_csv(files))]
    return b"".join([piece async for piece in zip_stream(entries)])


#: The same series as the real service sends it: DEFLATED entries with data descriptors.
JAVA_ZIP = anyio.run(_java_zip, FILES)


def _through_the_sink(data: bytes, staging: Path, **figures: object) -> UnpackedSeries:
    sink = ZipSeriesSink(staging, **figures)  # type: ignore[arg-type]
    for at in range(0, len(data), 4096):
        sink.write(data[at:at + 4096])
    return sink.finish()


def _through_the_partial(data: bytes, staging: Path, **figures: object) -> UnpackedSeries:
    zip_path = staging.parent.parent / "s.zip.partial"
    zip_path.write_bytes(data)
    return verify_and_unpack(zip_path, staging, **figures)  # type: ignore[arg-type]


UNPACKERS = {"verify_and_unpack": _through_the_partial, "sink": _through_the_sink}


@pytest.mark.parametrize("unpacker", sorted(UNPACKERS))
@pytest.mark.parametrize("original,kind", [(ZIP, "hand-made"), (JAVA_ZIP, "deflated, data descriptors")],
                         ids=["hand-made", "java-deflated"])
def test_mutated_zips_are_accepted_whole_or_refused_as_series_errors(tmp_path_factory, figures, original, kind,
                                                                      unpacker):
    root = tmp_path_factory.mktemp("zipfuzz")
    tried = {"examples": 0, "accepted": 0, "refused": 0}

    @settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=mutations(original))
    def check(data: bytes) -> None:
        tried["examples"] += 1
        work = root / f"w{tried['examples']}"
        work.mkdir()
        staging = work / "tmp" / "s.staging"
        try:
            result = UNPACKERS[unpacker](data, staging, series_uid=SERIES, image_count=3,
                                         file_size=sum(len(d) for _, d in FILES), limits=Limits(), max_repairs=0)
        except SeriesError as exc:
            assert str(exc).strip()
            assert unpacker != "sink" or not staging.exists()  # a refusing sink removed what it wrote
            tried["refused"] += 1
        else:
            tried["accepted"] += 1
            assert {f.md5 for f in result.files} == MD5
            for f in result.files:
                assert hashlib.md5((staging / f.name).read_bytes()).hexdigest() == f.md5
        written = {p.relative_to(work) for p in work.rglob("*")}
        assert all(p == Path("s.zip.partial") or p.parts[0] == "tmp" for p in written), written
        assert all(len(p.parts) <= 3 for p in written), written  # nothing nested below the staging folder
        shutil.rmtree(work)

    check()
    assert tried["refused"] > 0 and tried["examples"] == tried["accepted"] + tried["refused"]
    figures.record("hostile", family=f"mutated ZIPs ({kind}), hypothesis ({unpacker})", inputs=tried["examples"],
                   hypothesis_examples=tried["examples"], accepted=tried["accepted"], refused=tried["refused"])


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on mangled headers, on purpose
def test_mutated_dicom_with_a_matching_md5_is_accepted_only_if_it_is_this_series(tmp_path_factory, figures):
    """The ZIP is honest (its md5hashes.csv lists the mutated bytes), so only the DICOM check can
    refuse the file: whatever is accepted must be, for pydicom, an instance of this series."""
    import pydicom

    root = tmp_path_factory.mktemp("dicomfuzz")
    tried = {"examples": 0, "accepted": 0, "refused": 0}
    name, original = FILES[1]

    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=mutations(original[:700]).map(lambda head: head + original[700:]))
    def check(data: bytes) -> None:
        tried["examples"] += 1
        work = root / f"w{tried['examples']}"
        work.mkdir()
        files = [FILES[0], (name, data), FILES[2]]
        zip_path, staging = work / "s.zip.partial", work / "s.staging"
        zip_path.write_bytes(honest_zip(files))
        try:
            result = verify_and_unpack(zip_path, staging, series_uid=SERIES, image_count=3,
                                       file_size=sum(len(d) for _, d in files), limits=Limits(), max_repairs=0)
        except SeriesError as exc:
            assert str(exc).strip()
            tried["refused"] += 1
        else:
            tried["accepted"] += 1
            for f in result.files:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds = pydicom.dcmread(staging / f.name, stop_before_pixels=True)
                    # as read_dicom_ids: the file meta's instance UID stands in for a missing one
                    sop = ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID")
                    assert str(ds.SeriesInstanceUID) == SERIES and str(sop) == f.sop_uid
            assert len({f.sop_uid for f in result.files}) == 3
        shutil.rmtree(work)

    check()
    assert tried["refused"] > 0 and tried["accepted"] > 0, tried
    figures.record("hostile", family="mutated DICOM headers with matching MD5, hypothesis (verify_and_unpack)",
                   inputs=tried["examples"], hypothesis_examples=tried["examples"], accepted=tried["accepted"],
                   refused=tried["refused"])
