"""harvester.unpack's DICOM header walk (the fast path of ``read_dicom_ids``) agrees with
pydicom wherever it answers, and leaves to pydicom everything it cannot vouch for."""
from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file, get_testdata_files

from harvester import unpack
from harvester.errors import IntegrityError
from harvester.unpack import dicom_ids_by_pydicom, header_ids, read_dicom_ids

SAMPLES = sorted({Path(p) for p in get_testdata_files("**/*") if Path(p).is_file()})
CT_SMALL = Path(get_testdata_file("CT_small.dcm"))


def pydicom_ids(path: Path) -> tuple[str, str, str] | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return dicom_ids_by_pydicom(path)
        except IntegrityError:
            return None


def test_most_sample_files_take_the_fast_path_and_agree_with_pydicom() -> None:
    fast = 0
    for path in SAMPLES:
        found = header_ids(path.read_bytes(), complete=True)
        if found is None:
            continue
        fast += 1
        assert found == pydicom_ids(path), path.name
    assert fast >= 100, "the fast path should cover pydicom's ordinary test files"


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "image_dfl.dcm", "no_meta.dcm",
                                  "meta_missing_tsyntax.dcm", "UN_sequence.dcm"])
def test_what_the_walk_cannot_vouch_for_is_left_to_pydicom(name: str) -> None:
    path = Path(get_testdata_file(name))
    assert header_ids(path.read_bytes(), complete=True) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            expected = dicom_ids_by_pydicom(path)
        except IntegrityError:
            with pytest.raises(IntegrityError):
                read_dicom_ids(path)
            return
        assert read_dicom_ids(path) == expected


def test_nested_sequences_of_both_kinds_are_walked() -> None:
    ds = pydicom.dcmread(CT_SMALL)
    inner = pydicom.Dataset()
    inner.ReferencedSOPInstanceUID = "1.2.3.4"
    inner.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    deeper = pydicom.Dataset()
    deeper.CodeValue = "X"
    inner.ConceptNameCodeSequence = [deeper]
    ds.ReferencedImageSequence = [inner, inner]
    for undefined in (False, True):
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if undefined:  # pydicom writes sequences with undefined length when asked so
                ds.ReferencedImageSequence.is_undefined_length = True
                for item in ds.ReferencedImageSequence:
                    item.is_undefined_length_sequence_item = True
            ds.save_as(buf)
        data = buf.getvalue()
        assert header_ids(data, complete=True) == (str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                                                    str(ds.SOPClassUID))


def test_a_header_cut_short_is_never_answered_wrongly() -> None:
    data = CT_SMALL.read_bytes()
    whole = header_ids(data, complete=True)
    assert whole is not None
    for cut in range(0, 1200):
        got = header_ids(data[:cut], complete=False)
        assert got is None or got == whole


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1400), st.integers(0, 255)), min_size=1, max_size=6))
def test_damaged_headers_agree_with_pydicom_or_go_to_it(flips: list[tuple[int, int]]) -> None:
    """Whatever the walk answers for damaged bytes is what pydicom answers; it never raises."""
    data = bytearray(CT_SMALL.read_bytes())
    for where, value in flips:
        data[where] = value
    found = header_ids(bytes(data), complete=True)
    if found is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(bytes(data)), stop_before_pixels=True)
        sop = str(ds.get("SOPInstanceUID", "") or "") or str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "")
        assert found == (str(ds.get("SeriesInstanceUID", "") or ""), sop, str(ds.get("SOPClassUID", "") or ""))


def _verdict(walk: Any, data: bytes) -> Any:
    found: dict[int, bytes] = {}
    try:
        return walk(data, found), found
    except (unpack._Unsure, struct.error, IndexError, ValueError) as exc:
        return type(exc)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(132, 1400), st.integers(0, 255)), max_size=6), st.integers(140, 1500))
def test_the_inlined_top_level_walk_gives_the_general_walks_verdict(flips: list[tuple[int, int]], cut: int) -> None:
    """``_walk_top_explicit`` is ``_walk_dataset(..., top=True)`` for explicit VR with the element
    step inlined: the same end, the same elements found, the same refusal, on damaged and cut bytes."""
    data = bytearray(CT_SMALL.read_bytes()[:cut])
    for where, value in flips:
        if where < len(data):
            data[where] = value
    pos = 132
    while pos + 8 <= len(data) and struct.unpack_from("<H", data, pos)[0] == 0x0002:
        try:
            pos = unpack._element(bytes(data), pos, True, {}, unpack._META_WANTED, 0)
        except (unpack._Unsure, struct.error):
            return
    general = _verdict(lambda b, f: unpack._walk_dataset(b, pos, True, f, 0, top=True), bytes(data))
    assert _verdict(lambda b, f: unpack._walk_top_explicit(b, pos, f), bytes(data)) == general


def test_the_inlined_top_level_walk_agrees_on_every_sample_file() -> None:
    """The same, over pydicom's sample files (sequences of both kinds, private tags, odd VRs)."""
    compared = 0
    for path in SAMPLES:
        data = path.read_bytes()
        if len(data) < 132 or data[128:132] != b"DICM":
            continue
        pos = 132
        try:
            while pos + 8 <= len(data) and struct.unpack_from("<H", data, pos)[0] == 0x0002:
                pos = unpack._element(data, pos, True, {}, unpack._META_WANTED, 0)
        except (unpack._Unsure, struct.error):
            continue
        for cut in (len(data), min(len(data), 4096)):
            general = _verdict(lambda b, f: unpack._walk_dataset(b, pos, True, f, 0, top=True), data[:cut])
            assert _verdict(lambda b, f: unpack._walk_top_explicit(b, pos, f), data[:cut]) == general, path.name
            compared += 1
    assert compared > 50


def test_the_charsets_answered_without_pydicom_are_ones_pydicom_decodes() -> None:
    import pydicom.charset

    known = {name.encode("ascii") for name in pydicom.charset.python_encoding if name.isascii()}
    assert unpack._COMMON_CHARSETS <= known
    assert unpack._known_charsets() == frozenset(known)


def test_a_verified_ct_file_and_its_metadata_row_need_no_pydicom(tmp_path: Path) -> None:
    """The fast walk of an ordinary header (ISO_IR 100) and the SOP class's name in metadata.csv
    do not import pydicom (a third of a CPU-second at every run's start and end)."""
    import subprocess
    import sys

    head = CT_SMALL.read_bytes()
    (tmp_path / "ct.dcm").write_bytes(head.replace(b"ISO_IR 100", b"ISO_IR 192"))
    script = (
        "import sys; from pathlib import Path\n"
        "from harvester.unpack import read_dicom_ids\n"
        "from harvester.store.state import _sop_class_name\n"
        f"ids = read_dicom_ids(Path({str(tmp_path / 'ct.dcm')!r}))\n"
        "name = _sop_class_name(ids[2])\n"
        "print(name, ids[2], 'pydicom' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == "False"
    assert " ".join(out[:-2]) == pydicom.uid.UID(out[-2]).name == "CT Image Storage"


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")   # pydicom on "not a uid", meant
def test_sop_class_names_are_pydicoms() -> None:
    from harvester.store.state import _sop_class_name

    for uid in [*pydicom.uid.UID_dictionary, "1.2.3.4.5", "not a uid"]:
        assert _sop_class_name(uid) == str(pydicom.uid.UID(uid).name), uid
    assert _sop_class_name("") == ""
