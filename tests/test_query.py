"""harvester.query: manifests, .tcia carts and UID lists parse into a Query, or fail with a
ManifestError that names the file and the key or line at fault (never any other exception)."""
from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harvester.errors import ManifestError, UsageError
from harvester.query import (
    Exclusion,
    Query,
    fold,
    load_query,
    parse_manifest,
    parse_tcia,
    parse_uid_list,
    query_from_dict,
)

UID1 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.298806137288633453246975630178"   # 64 characters: the maximum
UID2 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
UID3 = "1.2.840.113654.2.55.4303894980888172655039716573617"
STUDY = "1.3.6.1.4.1.14519.5.2.1.6279.6001.175012972118199124641098335511"

REAL_CART = (
    "downloadServerUrl=https://nbia.cancerimagingarchive.net/nbia-download/servlet/DownloadServlet\n"
    "includeAnnotation=true\n"
    "noOfrRetry=4\n"
    "databasketId=manifest-1600709154662.tcia\n"
    "manifestVersion=3.0\n"
    "ListOfSeriesToDownload=\n"
    f"{UID1}\n"
    f"{UID2}\n"
)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_bytes(content.encode("utf-8"))
    else:
        path.write_bytes(content)
    return path


def manifest_error(path_or_fn, *needles: str) -> ManifestError:
    """Run ``load_query(path)`` (or a callable) and check the ManifestError names every needle."""
    with pytest.raises(ManifestError) as info:
        if callable(path_or_fn):
            path_or_fn()
        else:
            load_query(path_or_fn)
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)
    assert "\n" not in info.value.one_line()
    return info.value


def is_valid_uid(uid: str) -> bool:
    return len(uid) <= 64 and re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid) is not None


# ---------------------------------------------------------------- YAML / JSON manifests

FULL_YAML = f"""
api: https://nbia.example.org/nbia-api/services/v4
layout: classic
limit: 10
select:
  - collection: LIDC-IDRI
    modality: [CT, SEG]
    body_part: CHEST
    manufacturer: [GE MEDICAL SYSTEMS, SIEMENS]
    patients: [LIDC-IDRI-0001, LIDC-IDRI-0002]
    studies: [{STUDY}]
    released_after: 2020-01-31
  - series: [{UID1}, {UID1}, {UID3}]
  - tcia: carts/cart.tcia
  - csv: lists/series.csv
  - collection: CPTAC-LSCC
exclude:
  collection: TCGA-X
  modality: [SEG, RTSTRUCT]
  body_part: [HEAD]
  manufacturer: [Philips]
  patients: [P-9]
  studies: ["{STUDY}"]
  series: ["{UID2}"]
"""


@pytest.fixture
def manifest_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    write(folder / "carts" / "cart.tcia", REAL_CART)
    write(folder / "lists" / "series.csv", f"SeriesInstanceUID,Note\n{UID3},x\n{UID2},y\n")
    return folder


def check_full_query(query: Query, origin: Path) -> None:
    assert query.origin == str(origin)
    assert query.api == "https://nbia.example.org/nbia-api/services/v4"
    assert query.layout == "classic"
    assert query.limit == 10
    assert len(query.selectors) == 5
    lidc, series, tcia, csv_sel, cptac = query.selectors
    assert lidc.collection == "LIDC-IDRI"
    assert lidc.modality == ("CT", "SEG")
    assert lidc.body_part == ("CHEST",)
    assert lidc.manufacturer == ("GE MEDICAL SYSTEMS", "SIEMENS")
    assert lidc.patients == ("LIDC-IDRI-0001", "LIDC-IDRI-0002")
    assert lidc.studies == (STUDY,)
    assert lidc.released_after == dt.date(2020, 1, 31)
    assert lidc.series == ()
    assert "select[0]" in lidc.origin
    assert series.collection is None and series.series == (UID1, UID3)   # de-duplicated, order kept
    assert tcia.series == (UID1, UID2)
    assert str(origin.parent / "carts" / "cart.tcia") in tcia.origin
    assert csv_sel.series == (UID3, UID2)
    assert cptac.collection == "CPTAC-LSCC" and cptac.modality == () and cptac.released_after is None
    ex = query.exclude
    assert ex.collection == {"TCGA-X"}
    assert ex.modality == {"SEG", "RTSTRUCT"}
    assert ex.body_part == {"HEAD"}
    assert ex.manufacturer == {"Philips"}
    assert ex.patients == {"P-9"}
    assert ex.studies == {STUDY}
    assert ex.series == {UID2}


def test_yaml_manifest_with_every_key(manifest_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(manifest_dir / "query.yaml", FULL_YAML)
    # References resolve against the manifest's folder, not the working directory.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    check_full_query(load_query(path), path)


def test_json_manifest_with_every_key(manifest_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = yaml.safe_load(FULL_YAML)
    data["select"][0]["released_after"] = "2020-01-31"     # JSON has no dates
    path = write(manifest_dir / "query.json", json.dumps(data, indent=2))
    monkeypatch.chdir(tmp_path)
    check_full_query(load_query(path), path)


def test_yml_suffix_and_upper_case_suffix(manifest_dir: Path) -> None:
    for name in ("q.yml", "Q.YAML"):
        path = write(manifest_dir / name, f"select:\n  - series: {UID1}\n")
        assert load_query(path).selectors[0].series == (UID1,)


def test_absolute_reference_is_used_as_is(tmp_path: Path) -> None:
    cart = write(tmp_path / "carts" / "abs.tcia", REAL_CART)
    path = write(tmp_path / "other" / "q.yaml", f"select:\n  - tcia: {cart}\n")
    assert load_query(path).selectors[0].series == (UID1, UID2)


def test_select_may_be_a_single_mapping_and_scalars_become_tuples() -> None:
    query = query_from_dict({"select": {"collection": "LIDC-IDRI", "modality": "CT", "patients": 17}})
    (sel,) = query.selectors
    assert sel.collection == "LIDC-IDRI"
    assert sel.modality == ("CT",)
    assert sel.patients == ("17",)
    assert query.limit is None and query.api is None and query.layout is None
    assert query.exclude == Exclusion()


def test_union_keeps_every_selector_in_order() -> None:
    query = query_from_dict({"select": [{"collection": "A"}, {"collection": "B"}, {"series": [UID1]},
                                        {"collection": "A", "modality": "MR"}]})
    assert [s.collection for s in query.selectors] == ["A", "B", None, "A"]
    assert query.selectors[3].modality == ("MR",)


def test_exclusion_matches_rows() -> None:
    query = query_from_dict({"select": [{"collection": "A"}],
                             "exclude": {"modality": ["SEG"], "series": [UID2], "patients": "P1"}})
    ex = query.exclude
    assert ex.excludes({"Modality": "SEG", "SeriesInstanceUID": UID1})
    assert ex.excludes({"Modality": "CT", "SeriesInstanceUID": UID2})
    assert ex.excludes({"PatientID": "P1"})
    assert not ex.excludes({"Modality": "CT", "SeriesInstanceUID": UID1, "PatientID": "P2"})
    assert not Exclusion().excludes({"Modality": "SEG"})


def test_selectors_and_exclusions_compare_as_the_server_does() -> None:
    """UPPER(column) = UPPER(value) for collection, modality, body part, manufacturer and patient;
    UIDs exactly. (A row without a Collection passes: the source knows where it came from.)"""
    assert fold("ct") == fold("Ct") == fold("CT") == "CT" and fold(17) == "17"
    (sel,) = query_from_dict({"select": [{"collection": "lidc-idri", "modality": ["ct", "Mr"],
                                          "body_part": "chest", "manufacturer": "siemens",
                                          "patients": "lidc-idri-0001"}]}).selectors
    row = {"Collection": "LIDC-IDRI", "Modality": "CT", "BodyPartExamined": "CHEST", "Manufacturer": "SIEMENS",
           "PatientID": "LIDC-IDRI-0001", "StudyInstanceUID": STUDY}
    assert sel.matches(row) and sel.matches({**row, "Modality": "mr"})
    assert sel.matches({k: v for k, v in row.items() if k != "Collection"})
    for key, other in (("Collection", "LIDC-IDRI-2"), ("Modality", "PT"), ("BodyPartExamined", "HEAD"),
                       ("Manufacturer", "GE"), ("PatientID", "LIDC-IDRI-0002")):
        assert not sel.matches({**row, key: other}), key
    assert not sel.matches({k: v for k, v in row.items() if k != "Modality"})  # a filter needs the value
    (by_study,) = query_from_dict({"select": [{"studies": [STUDY]}]}).selectors
    assert by_study.matches(row) and not by_study.matches({**row, "StudyInstanceUID": STUDY + "1"})
    ex = query_from_dict({"select": [{"collection": "A"}],
                          "exclude": {"modality": "seg", "patients": "p1", "series": [UID2]}}).exclude
    assert ex.excludes({"Modality": "SEG"}) and ex.excludes({"PatientID": "P1"})
    assert ex.excludes({"SeriesInstanceUID": UID2}) and not ex.excludes({"Modality": "CT", "PatientID": "P2"})


@FAST
@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 -_.^", min_size=1, max_size=20),
       st.randoms())
def test_matching_ignores_case_whatever_the_value(value: str, rnd) -> None:
    """Any case-scrambling of a value selects (and excludes) the rows holding the value, and only those."""
    value = value.strip()
    if not value:
        return
    scrambled = "".join(c.upper() if rnd.random() < 0.5 else c.lower() for c in value)
    (sel,) = query_from_dict({"select": [{"collection": "A", "modality": scrambled}]}).selectors
    assert sel.matches({"Collection": "a", "Modality": value})
    assert not sel.matches({"Collection": "a", "Modality": value + "X"})
    ex = query_from_dict({"select": [{"collection": "A"}], "exclude": {"manufacturer": scrambled}}).exclude
    assert ex.excludes({"Manufacturer": value}) and not ex.excludes({"Manufacturer": "X" + value})


def test_patients_alone_and_studies_alone_are_selectors() -> None:
    """getSeries takes PatientID alone or StudyInstanceUID alone, and a PACS has no collections."""
    query = query_from_dict({"select": [{"patients": ["P-1", "P-2"]}, {"studies": STUDY, "modality": "CT"},
                                        {"patients": "P-3", "studies": [STUDY]}]}, origin="q.yaml")
    patients, studies, both = query.selectors
    assert patients.collection is None and patients.patients == ("P-1", "P-2") and patients.series == ()
    assert studies.collection is None and studies.studies == (STUDY,) and studies.modality == ("CT",)
    assert both.patients == ("P-3",) and both.studies == (STUDY,)
    assert query.to_json()["select"][0] == {"patients": ["P-1", "P-2"]}
    with pytest.raises(ManifestError, match="studies"):
        query_from_dict({"select": [{"studies": ["not-a-uid"]}]})
    with pytest.raises(ManifestError, match=r"select\[0\]: missing 'collection' \(or give patients or studies"):
        query_from_dict({"select": [{"modality": "CT", "body_part": "CHEST"}]})


def test_selectors_describe_themselves_for_warnings() -> None:
    sels = query_from_dict({"select": [
        {"collection": "X", "modality": "MR"}, {"patients": ["A", "B", "C", "D"]},
        {"series": [UID1, UID2]}, {"series": UID3}, {"collection": "Y", "released_after": "2021-02-03"}]}).selectors
    assert [s.describe() for s in sels] == [
        "collection: X, modality: MR", "patients: [A, B, C, ... (4 in all)]", "series: 2 UIDs", f"series: {UID3}",
        "collection: Y, released_after: 2021-02-03"]


def test_query_to_json_is_serialisable() -> None:
    query = query_from_dict({"select": [{"collection": "A", "released_after": "2021-02-03"}, {"series": UID1}],
                             "exclude": {"modality": ["SEG", "RTSTRUCT"]}, "limit": 3}, origin="q.yaml")
    doc = json.loads(json.dumps(query.to_json()))
    assert doc == {"origin": "q.yaml",
                   "select": [{"collection": "A", "released_after": "2021-02-03"}, {"series": [UID1]}],
                   "exclude": {"modality": ["RTSTRUCT", "SEG"]}, "limit": 3}


def test_source_and_url() -> None:
    query = query_from_dict({"select": [{"collection": "A"}], "source": "dicomweb",
                             "url": "https://pacs.example.org/dicom-web"})
    assert query.source == "dicomweb" and query.url == "https://pacs.example.org/dicom-web"
    plain = query_from_dict({"select": [{"collection": "A"}]})
    assert plain.source is None and plain.url is None
    for bad in ({"source": "pacs"}, {"source": 1}, {"url": "file:///etc"}, {"url": ["https://x"]}):
        with pytest.raises(ManifestError) as info:
            query_from_dict({"select": [{"collection": "A"}], **bad}, origin="q.yaml")
        assert "q.yaml" in str(info.value) and next(iter(bad)) in str(info.value)


def test_released_after_accepts_yaml_datetimes_and_strings() -> None:
    for value in (dt.date(2024, 1, 31), dt.datetime(2024, 1, 31, 12, 0), "2024-01-31", " 2024-01-31 "):
        (sel,) = query_from_dict({"select": [{"collection": "A", "released_after": value}]}).selectors
        assert sel.released_after == dt.date(2024, 1, 31)


# Each case: YAML text, then substrings the message must contain (besides the file name).
BAD_MANIFESTS = [
    ("selct:\n  - collection: A\n", ["'selct'"]),
    ("select:\n  - collection: A\n    modalty: CT\n", ["select[0]", "'modalty'"]),
    ("select:\n  - collection: A\n  - series: [1.2]\n    colour: red\n", ["select[1]", "'colour'"]),
    ("select:\n  - collection: A\nexclude:\n  released_after: 2020-01-01\n", ["exclude", "'released_after'"]),
    ("select:\n  - collection: A\nexclude:\n  tcia: x.tcia\n", ["exclude", "'tcia'"]),
    ("select:\n  - collection: A\nexclude: [SEG]\n", ["exclude"]),
    ("select:\n  - collection: A\nexclude:\n  modality: []\n", ["exclude.modality"]),
    ("select:\n  - collection: A\nexclude:\n  modality: {a: 1}\n", ["exclude.modality"]),
    ("api: x\n", ["'select'"]),
    ("select: []\n", ["'select'"]),
    ("select: LIDC-IDRI\n", ["'select'"]),
    ("select: 5\n", ["'select'"]),
    ("select:\n  - LIDC-IDRI\n", ["select[0]"]),
    ("select:\n  - [collection, A]\n", ["select[0]"]),
    ("select:\n  - {}\n", ["select[0]", "collection"]),
    ("select:\n  - modality: CT\n", ["select[0]", "collection"]),
    ("select:\n  - collection: [A, B]\n", ["select[0].collection"]),
    ("select:\n  - collection: {name: A}\n", ["select[0].collection"]),
    ("select:\n  - collection: true\n", ["select[0].collection"]),
    ("select:\n  - collection: null\n", ["select[0].collection"]),
    ("select:\n  - collection: ''\n", ["select[0].collection"]),
    ("select:\n  - collection: \"A\\tB\"\n", ["select[0].collection"]),
    ("select:\n  - collection: A\n    modality: []\n", ["select[0].modality"]),
    ("select:\n  - collection: A\n    modality: [CT, [MR]]\n", ["select[0].modality"]),
    ("select:\n  - collection: A\n    modality: [CT, false]\n", ["select[0].modality"]),
    ("select:\n  - collection: A\n    body_part: {x: 1}\n", ["select[0].body_part"]),
    ("select:\n  - collection: A\n    manufacturer: [null]\n", ["select[0].manufacturer"]),
    ("select:\n  - collection: A\n    patients: [2020-01-01]\n", ["select[0].patients"]),
    ("select:\n  - collection: A\n    studies: [abc]\n", ["select[0].studies", "'abc'"]),
    ("select:\n  - collection: A\n    released_after: yesterday\n", ["select[0].released_after"]),
    ("select:\n  - collection: A\n    released_after: 20200131\n", ["select[0].released_after"]),
    ("select:\n  - collection: A\n    released_after: 2020-02-30x\n", ["select[0].released_after"]),
    ("select:\n  - series: [1.2.x]\n", ["select[0].series", "'1.2.x'"]),
    ("select:\n  - series: ['1..2']\n", ["select[0].series"]),
    ("select:\n  - series: ['.1.2']\n", ["select[0].series"]),
    ("select:\n  - series: ['1.2.']\n", ["select[0].series"]),
    ("select:\n  - series: ['1.2 3']\n", ["select[0].series"]),
    ("select:\n  - series: ['" + "1." * 32 + "1']\n", ["select[0].series"]),     # 65 characters
    ("select:\n  - series: []\n", ["select[0].series"]),
    ("select:\n  - series: {a: 1}\n", ["select[0].series"]),
    ("select:\n  - series: [1.2]\n    collection: A\n", ["select[0]"]),
    ("select:\n  - series: [1.2]\n    modality: CT\n", ["select[0]", "'series'"]),
    ("select:\n  - tcia: a.tcia\n    csv: b.csv\n", ["select[0]"]),
    ("select:\n  - tcia: a.tcia\n    modality: CT\n", ["select[0]", "'tcia'"]),
    ("select:\n  - csv: a.csv\n    collection: A\n", ["select[0]"]),
    ("select:\n  - tcia: 5\n", ["select[0].tcia"]),
    ("select:\n  - tcia: ''\n", ["select[0].tcia"]),
    ("select:\n  - csv: [a.csv]\n", ["select[0].csv"]),
    ("select:\n  - collection: A\nlimit: 0\n", ["limit"]),
    ("select:\n  - collection: A\nlimit: -3\n", ["limit"]),
    ("select:\n  - collection: A\nlimit: '5'\n", ["limit"]),
    ("select:\n  - collection: A\nlimit: 2.5\n", ["limit"]),
    ("select:\n  - collection: A\nlimit: true\n", ["limit"]),
    ("select:\n  - collection: A\napi: ftp://example.org/v4\n", ["api"]),
    ("select:\n  - collection: A\napi: 4\n", ["api"]),
    ("select:\n  - collection: A\nlayout: 4\n", ["layout"]),
    ("select:\n  - collection: A\nlayout: [classic]\n", ["layout"]),
    ("- select: []\n", ["mapping"]),
    ("just text\n", ["mapping"]),
    ("", ["mapping"]),
    ("# only a comment\n", ["mapping"]),
    # YAML keys are not always strings; the message must still name them
    ("select:\n  - collection: A\n1: x\nzz: y\n", ["unknown key"]),
    ("select:\n  - collection: A\n    7: x\n    zz: y\n", ["select[0]", "unknown key"]),
    ("select:\n  - collection: A\nexclude:\n  null: x\n  zz: y\n", ["exclude", "unknown key"]),
]


@pytest.mark.parametrize("text,needles", BAD_MANIFESTS, ids=[f"bad{i}" for i in range(len(BAD_MANIFESTS))])
def test_bad_manifest_names_file_and_key(tmp_path: Path, text: str, needles: list[str]) -> None:
    path = write(tmp_path / "query.yaml", text)
    manifest_error(path, str(path), *needles)


def test_bad_json_manifest_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path / "q.json", json.dumps({"select": [{"collection": "A", "modality": [1, {"x": 1}]}]}))
    manifest_error(path, str(path), "select[0].modality")


@pytest.mark.parametrize("text,line", [
    ("select:\n  - collection: A\n  modality: [CT\n", 3),
    ("select:\n  - collection: 'A\n", None),
    ("select:\n\t- collection: A\n", 2),
    ("a: b\na: [\n", None),
    ("? [a, b]\n: c\n", None),               # an unhashable key
    ("select: &x [*x]\n", None),
    ("select:\n  - collection: !!python/object:os.system ls\n", None),
])
def test_bad_yaml(tmp_path: Path, text: str, line: int | None) -> None:
    path = write(tmp_path / "q.yaml", text)
    manifest_error(path, str(path), *([f"line {line}"] if line else []))


def test_bad_json_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "q.json", '{\n  "select": [\n    {"collection": "A",}\n  ]\n}\n')
    manifest_error(path, str(path), "line 3")


@pytest.mark.parametrize("text", [
    "select:\n  - collection: A\n    released_after: 2020-13-45\n",   # YAML's own date resolver
    "select:\n  - collection: A\nlimit: " + "9" * 5000 + "\n",         # int() digit limit
    "[" * 1000 + "]" * 1000,                                            # nesting deeper than the stack
    "select: " + "{a: " * 1000 + "1" + "}" * 1000 + "\n",
])
def test_pathological_yaml_is_a_manifest_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "q.yaml", text)
    manifest_error(path, str(path))


@pytest.mark.parametrize("text", [
    '{"select": [{"collection": "A"}], "limit": ' + "9" * 5000 + "}",
    "[" * 100000 + "]" * 100000,
    '{"select": "\\ud800"}',
])
def test_pathological_json_is_a_manifest_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "q.json", text)
    manifest_error(path, str(path))


def test_missing_reference_names_the_referenced_file(tmp_path: Path) -> None:
    path = write(tmp_path / "q.yaml", "select:\n  - tcia: carts/nope.tcia\n")
    manifest_error(path, str(path), "select[0].tcia", str(tmp_path / "carts" / "nope.tcia"), "no such file")


def test_bad_reference_content_names_the_referenced_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "lists" / "s.csv", f"Series UID\n{UID1}\nnot-a-uid\n")
    path = write(tmp_path / "q.yaml", "select:\n  - csv: lists/s.csv\n")
    manifest_error(path, str(path), "select[0].csv", str(tmp_path / "lists" / "s.csv"), "line 3", "not-a-uid")


@pytest.mark.parametrize("ref", ["a\x00b.tcia", "x" * 5000 + ".tcia", "."])
def test_unusable_reference_path_is_a_manifest_error(tmp_path: Path, ref: str) -> None:
    path = write(tmp_path / "q.json", json.dumps({"select": [{"tcia": ref}]}))
    manifest_error(path, str(path), "select[0].tcia")


def test_reference_to_a_directory(tmp_path: Path) -> None:
    (tmp_path / "carts").mkdir()
    path = write(tmp_path / "q.yaml", "select:\n  - tcia: carts\n")
    manifest_error(path, str(path), "select[0].tcia", str(tmp_path / "carts"), "directory")


# ---------------------------------------------------------------- unreadable files

def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    manifest_error(path, str(path), "no such file")


def test_directory_instead_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "dir.yaml"
    path.mkdir()
    manifest_error(path, str(path), "directory")


@pytest.mark.parametrize("name", ["q.yaml", "q.json", "c.tcia", "l.csv", "l.txt"])
def test_binary_file(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, b"PK\x03\x04\x00\x00" + UID1.encode())
    manifest_error(path, str(path), "binary")


@pytest.mark.parametrize("name", ["q.yaml", "q.json", "c.tcia", "l.csv", "l.txt"])
def test_non_utf8_file(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, "ListOfSeriesToDownload=\nsélect: é\n".encode("latin-1"))
    manifest_error(path, str(path), "UTF-8")


@pytest.mark.parametrize("name", ["q.xml", "q", "q.tcia.bak"])
def test_unknown_file_type(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, REAL_CART)
    manifest_error(path, str(path), "unknown query file type")


def test_manifest_error_is_a_usage_error() -> None:
    assert issubclass(ManifestError, UsageError)


# ---------------------------------------------------------------- .tcia carts

def test_real_cart(tmp_path: Path) -> None:
    path = write(tmp_path / "manifest-1600709154662.tcia", REAL_CART)
    query = load_query(path)
    assert query.origin == str(path)
    (sel,) = query.selectors
    assert sel.series == (UID1, UID2)
    assert sel.collection is None


@pytest.mark.parametrize("text", [
    # header keys in another order, extra and missing keys, spaces around '='
    f"manifestVersion=3.0\nListOfSeriesToDownload=\n{UID1}\n{UID2}\n",
    f"ListOfSeriesToDownload=\n{UID1}\n{UID2}",
    f"downloadServerUrl=https://x/servlet?a=b&c=d\nnewKey = something=else\n"
    f"ListOfSeriesToDownload =\n{UID1}\n{UID2}\n",
    f"# comment line\n\ndownloadServerUrl=https://x\n\nincludeAnnotation=false\nListOfSeriesToDownload=\n\n"
    f"{UID1}\n\n   \n{UID2}   \n\n",
    # the first UID on the same line as the key
    f"manifestVersion=3.0\nListOfSeriesToDownload={UID1}\n{UID2}\n",
    f"ListOfSeriesToDownload= {UID1} \n{UID2}\n",
    # CRLF, CR, and a repeated UID
    f"manifestVersion=3.0\r\nListOfSeriesToDownload=\r\n{UID1}\r\n{UID2}\r\n{UID1}\r\n",
    f"manifestVersion=3.0\rListOfSeriesToDownload=\r{UID1}\r{UID2}\r",
    # a BOM even when the key is the very first thing in the file
    f"\ufeffListOfSeriesToDownload=\n{UID1}\n{UID2}\n",
    f"\ufeffmanifestVersion=3.0\nListOfSeriesToDownload=\n{UID1}\n{UID2}\n",
])
def test_cart_variations(text: str) -> None:
    assert parse_tcia(text, origin="cart.tcia") == (UID1, UID2)


@pytest.mark.parametrize("content", [
    ("\ufeff" + REAL_CART.replace("\n", "\r\n")).encode("utf-8"),
    REAL_CART.replace("\n", "\r\n").encode("utf-8"),
    b"\xef\xbb\xbfListOfSeriesToDownload=" + UID1.encode() + b"\r\n" + UID2.encode() + b"\r\n",
])
def test_cart_file_with_bom_and_crlf(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path / "c.tcia", content)
    assert load_query(path).selectors[0].series == (UID1, UID2)


@pytest.mark.parametrize("text,needles", [
    (f"manifestVersion=3.0\n{UID1}\n", ["ListOfSeriesToDownload"]),
    (f"ListOfSeriesToDownloadX=\n{UID1}\n", ["ListOfSeriesToDownload"]),
    ("", ["ListOfSeriesToDownload"]),
    ("manifestVersion=3.0\nListOfSeriesToDownload=\n", ["no series"]),
    ("ListOfSeriesToDownload=\n\n  \n", ["no series"]),
    (f"a=b\nListOfSeriesToDownload=\n{UID1}\nnot-a-uid\n", ["line 4", "'not-a-uid'"]),
    (f"a=b\r\nListOfSeriesToDownload=\r\n{UID1}\r\n\r\n1.2.3x\r\n", ["line 5", "'1.2.3x'"]),
    (f"ListOfSeriesToDownload={UID1}\n{UID2}\nbad\n", ["line 3", "'bad'"]),
    (f"ListOfSeriesToDownload=bad\n{UID2}\n", ["line 1", "'bad'"]),
    (f"ListOfSeriesToDownload=\n{UID1}x\n", ["line 2"]),
    (f"ListOfSeriesToDownload=\n{UID1}.1\n", ["line 2"]),                 # 66 characters
    (f"ListOfSeriesToDownload=\n{UID1} {UID2}\n", ["line 2"]),
    (f"ListOfSeriesToDownload=\n{UID1},{UID2}\n", ["line 2"]),
    ("ListOfSeriesToDownload=\n１.２.３\n", ["line 2"]),                     # full-width digits
])
def test_bad_cart(tmp_path: Path, text: str, needles: list[str]) -> None:
    path = write(tmp_path / "c.tcia", text)
    manifest_error(path, str(path), *needles)


# ---------------------------------------------------------------- CSV and plain lists

DATA_RETRIEVER_METADATA = (
    "Series UID,Collection,3rd Party Analysis,Data Description URI,Subject ID,Study UID,Study Description,"
    "Study Date,Series Description,Manufacturer,Modality,SOP Class Name,SOP Class UID,Number of Images,"
    "File Size,File Location,Download Timestamp\r\n"
    f"{UID1},LIDC-IDRI,NO,https://doi.org/10.7937/K9/TCIA.2015.LO9QL9SX,LIDC-IDRI-0001,{STUDY},,01-01-2000,,"
    "GE MEDICAL SYSTEMS,CT,CT Image Storage,1.2.840.10008.5.1.4.1.1.2,133,\"70.04 MB\","
    "./LIDC-IDRI/LIDC-IDRI-0001/01-01-2000-30178/3000566.000000-03192,2020-09-21T18:27:39.391\r\n"
    f"{UID2},LIDC-IDRI,NO,,LIDC-IDRI-0002,{STUDY},\"CHEST, W/O\",01-01-2000,\"a \"\"quoted\"\", desc\","
    "SIEMENS,CT,CT Image Storage,1.2.840.10008.5.1.4.1.1.2,1,\"1,024 KB\",./x,2020-09-21T18:27:40.000\r\n"
)


def test_data_retriever_metadata_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "metadata.csv", DATA_RETRIEVER_METADATA)
    assert load_query(path).selectors[0].series == (UID1, UID2)


@pytest.mark.parametrize("text", [
    f"Note,SeriesInstanceUID\nfirst,{UID1}\nsecond,{UID2}\n",
    f"Series Instance UID\n{UID1}\n{UID2}\n",
    f" SeriesInstanceUID ,Extra\n {UID1} ,a\n\n,b\n{UID2},c\n{UID1},d\n",      # blank cells skipped, de-duplicated
    f"\ufeffSeries UID,Collection\r\n{UID1},A\r\n{UID2},B\r\n",
    f"SeriesInstanceUID\r{UID1}\r{UID2}\r",                                    # old Mac line endings
    f"a,SeriesInstanceUID\n1\ny,{UID1}\nx,{UID2}\n",                           # a short row is skipped
])
def test_csv_with_uid_column(text: str) -> None:
    assert parse_uid_list(text, origin="l.csv") == (UID1, UID2)


@pytest.mark.parametrize("text", [
    f"{UID1}\n{UID2}\n",
    f"{UID1}\n{UID2}",
    f"\n\n{UID1}\n   \n{UID2}  \n\n",
    f"\ufeff{UID1}\r\n{UID2}\r\n{UID2}\r\n",
    f"{UID1}\r{UID2}\r",
])
def test_plain_uid_list(text: str) -> None:
    assert parse_uid_list(text, origin="l.txt") == (UID1, UID2)


def test_plain_uid_list_file_with_bom(tmp_path: Path) -> None:
    path = write(tmp_path / "l.txt", b"\xef\xbb\xbf" + f"{UID1}\r\n{UID2}\r\n".encode())
    assert load_query(path).selectors[0].series == (UID1, UID2)


@pytest.mark.parametrize("name,text,needles", [
    ("l.csv", "", ["no series UIDs"]),
    ("l.csv", "\n \n\n", ["no series UIDs"]),
    ("l.csv", "SeriesInstanceUID,Note\n", ["no series UIDs"]),
    ("l.csv", "SeriesInstanceUID,Note\n,a\n,b\n", ["no series UIDs"]),
    ("l.csv", "Collection,Modality\nLIDC,CT\n", ["no series UID column"]),
    ("l.csv", f"SeriesInstanceUID,Note\n{UID1},a\n1.2.3a,b\n", ["line 3", "'SeriesInstanceUID'", "'1.2.3a'"]),
    ("l.csv", f"Series UID\n{UID1}\n\n\n\nbad\n", ["line 6", "'bad'"]),
    ("l.txt", f"{UID1}\nbad\n", ["line 2", "'bad'"]),
    ("l.txt", f"{UID1}\n\n\nbad\n", ["line 4", "'bad'"]),
    ("l.txt", f"{UID1}\r\n\r\n{UID2},{UID1}\r\n", ["line 3"]),
    ("l.txt", "hello\n", ["no series UID column"]),
    ("l.txt", f"{UID1}.1\n", ["line 1"]),
])
def test_bad_uid_list(tmp_path: Path, name: str, text: str, needles: list[str]) -> None:
    path = write(tmp_path / name, text)
    manifest_error(path, str(path), *needles)


def test_huge_csv_field_is_a_manifest_error(tmp_path: Path) -> None:
    path = write(tmp_path / "l.csv", 'SeriesInstanceUID\n"' + "1" * 200_000 + '"\n')
    manifest_error(path, str(path))


# ---------------------------------------------------------------- any input: a result or a ManifestError

def check_uids(result: object) -> None:
    assert isinstance(result, tuple) and result
    assert len(set(result)) == len(result)
    assert all(isinstance(u, str) and is_valid_uid(u) for u in result), result


CART_LINES = st.sampled_from([
    "ListOfSeriesToDownload=", f"ListOfSeriesToDownload={UID1}", "manifestVersion=3.0", "a=b=c", "=", "",
    UID1, UID2, "1.2", "1..2", "#x", "\ufeff", "\x00", "é", "1.2\x00", " " + UID3 + " ", '"1.2"', "1,2",
])
SEPARATORS = st.sampled_from(["\n", "\r\n", "\r", "\x0b", "\x1c", "\u2028", "\x85"])


@st.composite
def line_soup(draw: st.DrawFn, lines: st.SearchStrategy[str]) -> str:
    parts = draw(st.lists(st.one_of(lines, st.text(max_size=20)), max_size=12))
    out = ""
    for part in parts:
        out += part + draw(SEPARATORS)
    return out


@FAST
@given(st.one_of(st.text(), line_soup(CART_LINES)))
def test_parse_tcia_returns_uids_or_manifest_error(text: str) -> None:
    try:
        result = parse_tcia(text, origin="any.tcia")
    except ManifestError as exc:
        assert "any.tcia" in str(exc)
    else:
        check_uids(result)


CSV_LINES = st.sampled_from([
    "SeriesInstanceUID", "Series UID", "Series Instance UID,Note", "Note,SeriesUID", UID1, UID2, f"{UID1},x",
    f"x,{UID2}", '"' + UID3, f'"{UID1}"', ",", "", "\x00", "\ufeff", "1.2.", "a,b,c",
])


@FAST
@given(st.one_of(st.text(), line_soup(CSV_LINES)))
def test_parse_uid_list_returns_uids_or_manifest_error(text: str) -> None:
    try:
        result = parse_uid_list(text, origin="any.csv")
    except ManifestError as exc:
        assert "any.csv" in str(exc)
    else:
        check_uids(result)


def check_query(text: str, origin: str, base_dir: Path) -> None:
    try:
        query = parse_manifest(text, origin=origin, base_dir=base_dir)
    except ManifestError as exc:
        assert origin in str(exc)
    else:
        assert isinstance(query, Query) and query.selectors
        for sel in query.selectors:
            assert sel.collection or sel.series or sel.patients or sel.studies   # patients or studies alone: a selector (query.py)
            for uid in sel.series + sel.studies:
                assert is_valid_uid(uid)


YAML_SNIPPETS = st.sampled_from([
    "select:", "  - collection: A", "  - series: [1.2]", "    modality: CT", "exclude:", "  modality: SEG",
    "limit: 3", "limit: 0", "api: http://x/v4", "layout: flat", "- x", "  - tcia: c.tcia", "  - csv: l.csv",
    "    released_after: 2020-02-30", "    released_after: 2020-01-01", "{", "[", "&a", "*a", "!!binary", "? ",
    ": x", "'", "\"", "  ", "\t", "1: 2", "~: x", "select: &a [*a]", "%YAML 1.1", "---", "...",
    "    studies: [1.2, x]", "    patients: [1, 2.5, true]",
])


@FAST
@given(st.one_of(st.text(), line_soup(YAML_SNIPPETS)), st.sampled_from(["m.yaml", "m.json"]))
def test_parse_manifest_returns_query_or_manifest_error(tmp_path: Path, text: str, origin: str) -> None:
    write(tmp_path / "c.tcia", REAL_CART)
    write(tmp_path / "l.csv", f"SeriesInstanceUID\n{UID2}\n")
    check_query(text, str(tmp_path / origin), tmp_path)


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
                         st.sampled_from([UID1, "1.2", "2020-01-31", "CT", "c.tcia", "l.csv", ""]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=6), st.sampled_from(sorted(
        {"collection", "modality", "body_part", "manufacturer", "patients", "studies", "released_after",
         "series", "tcia", "csv", "select", "exclude", "limit", "api", "layout"}))), inner, max_size=4),
), max_leaves=12)


@st.composite
def manifest_like(draw: st.DrawFn) -> dict:
    selector_keys = st.sampled_from(["collection", "modality", "body_part", "manufacturer", "patients", "studies",
                                     "released_after", "series", "tcia", "csv", "other"])
    select = draw(st.lists(st.dictionaries(selector_keys, JSON_VALUES, max_size=4), max_size=3))
    doc = draw(st.dictionaries(st.sampled_from(["exclude", "limit", "api", "layout", "junk"]), JSON_VALUES,
                               max_size=3))
    if draw(st.booleans()):
        doc["select"] = select
    return doc


@settings(FAST, max_examples=100)
@given(st.one_of(manifest_like(), JSON_VALUES))
def test_query_from_dict_returns_query_or_manifest_error(tmp_path: Path, data: object) -> None:
    write(tmp_path / "c.tcia", REAL_CART)
    write(tmp_path / "l.csv", f"SeriesInstanceUID\n{UID2}\n")
    text = json.dumps(data)
    check_query(text, str(tmp_path / "m.json"), tmp_path)
    check_query(yaml.safe_dump(data), str(tmp_path / "m.yaml"), tmp_path)


REAL_CARTS = sorted((Path(__file__).parent / "data" / "real-nbia" / "manifests").glob("*.tcia"))


def listed_uids(cart: Path) -> list[str]:
    """The UID lines of a cart, read the plain way: every non-empty line after ListOfSeriesToDownload=."""
    lines = cart.read_bytes().decode("utf-8-sig").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ListOfSeriesToDownload="))
    return [line.strip() for line in lines[start + 1:] if line.strip()]


def test_the_real_carts_are_all_there() -> None:
    assert len(REAL_CARTS) == 10
    counts = {cart.name: listed_uids(cart) for cart in REAL_CARTS}
    assert max(len(set(uids)) for uids in counts.values()) == 3042
    assert any(len(uids) != len(set(uids)) for uids in counts.values())  # one repeats a UID


@pytest.mark.parametrize("cart", REAL_CARTS, ids=lambda p: p.name)
def test_real_portal_carts_parse(cart: Path) -> None:
    """Real carts (old hosts, CRLF, a repeated UID, no final newline, 3,042 UIDs) give exactly their
    UIDs, once each, in the cart's order, as one series selector."""
    query = load_query(cart)
    (sel,) = query.selectors
    assert sel.series == tuple(dict.fromkeys(listed_uids(cart))) and sel.series
    assert sel.collection is None and sel.origin == str(cart) and query.origin == str(cart)


def test_tsv_uid_column(tmp_path):
    from harvester.query import load_query

    path = tmp_path / "list.tsv"
    path.write_text("SeriesInstanceUID\tNote\n1.2.3\tfirst\n1.2.4\tsecond\n")
    assert load_query(path).selectors[0].series == ("1.2.3", "1.2.4")
