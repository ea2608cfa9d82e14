"""harvester.store.layout: sanitised path components, the Data Retriever's layouts, templates, and
series folders that are unique and never nested in one another."""
from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harvester.errors import UsageError
from harvester.store.layout import (
    MAX_COMPONENT_BYTES,
    assign_paths,
    check_layout,
    descriptive_parts,
    instance_filename,
    safe_component,
    series_parts,
    series_path,
)

FAST = settings(max_examples=200, deadline=None)

STUDY_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.298806137288633453246975630178"
SERIES_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}


def assert_safe(name: str) -> None:
    assert isinstance(name, str) and name
    assert name not in (".", "..")
    assert not name.endswith((".", " "))
    assert len(name.encode("utf-8")) <= MAX_COMPONENT_BYTES
    for ch in name:
        assert ch not in '/\\\x00<>:"|?*', (ch, name)
        assert unicodedata.category(ch)[0] != "C", (hex(ord(ch)), name)
    # Windows ignores the extension and trailing spaces when it looks for device names.
    assert name.split(".")[0].rstrip(" ").upper() not in RESERVED, name


ANY_VALUE = st.one_of(st.text(), st.text(alphabet=st.characters(codec="utf-8"), min_size=100, max_size=400),
                      st.integers(), st.floats(), st.none(), st.sampled_from(
                          ["..", ".", "...", " . ", "../../etc/passwd", "con", "CON.txt", "nul.tar.gz", "LpT9",
                           "com1 ", "aux.", "Prn .log", "\x00", "a\x00b", "é" * 200, "\u202e\u200b", "C:\\x"]))


@FAST
@given(ANY_VALUE)
def test_safe_component_is_always_safe(value: object) -> None:
    assert_safe(safe_component(value))


@FAST
@given(ANY_VALUE)
def test_safe_component_is_stable(value: object) -> None:
    # A name already made safe is left alone, so a resumed run computes the same folders.
    once = safe_component(value)
    assert safe_component(once) == once


@FAST
@given(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,60}[A-Za-z0-9_-]", fullmatch=True))
def test_ordinary_names_are_kept(name: str) -> None:
    if name.split(".")[0].upper() in RESERVED:
        return
    assert safe_component(name) == name


@FAST
@given(st.text(min_size=1), st.text(min_size=1))
def test_long_inputs_stay_distinct(a: str, b: str) -> None:
    prefix = "Series description that goes on and on " * 4     # > 120 bytes on its own
    if a == b:
        return
    first, second = safe_component(prefix + a), safe_component(prefix + b)
    assert first != second
    assert_safe(first)
    assert_safe(second)


def test_long_names_differing_only_in_unsafe_characters_stay_distinct() -> None:
    prefix = "x" * 200
    names = {safe_component(prefix + tail) for tail in ("/", "\\", ":", "\x00", "?", "*")}
    assert len(names) == 6


@pytest.mark.parametrize("value,expected", [
    ("LIDC-IDRI-0001", "LIDC-IDRI-0001"),
    (SERIES_UID, SERIES_UID),
    ("CHEST/ABD", "CHEST-ABD"),
    ("a\\b", "a-b"),
    ("../../x", "..-..-x"),
    ("..", "_"),
    (".", "_"),
    ("", "_"),
    (None, "_"),
    ("   ", "_"),
    ("name. . .", "name"),
    ("a\x00b", "a_b"),
    ("a\tb\nc", "a_b_c"),
    ("a  \u3000 b", "a    b"),          # every white space one space, runs kept (the Retriever keeps them)
    ("  PETCT HEAD  NECK CA  ", "PETCT HEAD  NECK CA"),
    ("e\u0301", "\u00e9"),           # NFC
    (3000566, "3000566"),
    ("CON", "_CON"),
    ("con", "_con"),
    ("Con.txt", "_Con.txt"),
    ("nul.tar.gz", "_nul.tar.gz"),
    ("COM1", "_COM1"),
    ("lpt1.dcm", "_lpt1.dcm"),
    ("AUX.", "_AUX"),
    ("PRN ", "_PRN"),
    ("CONSOLE", "CONSOLE"),
    ("COM10", "COM10"),
])
def test_safe_component_examples(value: object, expected: str) -> None:
    assert safe_component(value) == expected


@pytest.mark.parametrize("value", ["CON .txt", "nul   .tar.gz", "Com1 .dcm", "lpt9 ."])
def test_device_names_with_spaces_before_the_extension(value: str) -> None:
    assert_safe(safe_component(value))


def test_truncated_name_keeps_a_readable_prefix_and_respects_the_byte_limit() -> None:
    name = safe_component("é" * 300)                          # 600 UTF-8 bytes
    assert len(name.encode("utf-8")) <= MAX_COMPONENT_BYTES
    assert name.startswith("é" * 50)
    assert re.search(r"~[0-9a-f]{8}$", name)
    assert safe_component("x" * 120) == "x" * 120             # exactly at the limit: untouched
    assert safe_component("x" * 121) != "x" * 121


# ---------------------------------------------------------------- descriptive layout (the Data Retriever's)

FULL = {
    "Collection": "LIDC-IDRI",
    "PatientID": "LIDC-IDRI-0001",
    "StudyInstanceUID": STUDY_UID,
    "StudyDate": "2000-01-01",
    "StudyID": "5",
    "StudyDescription": "CHEST/ABD PELVIS",
    "SeriesInstanceUID": SERIES_UID,
    "SeriesNumber": "3000566",
    "SeriesDescription": "Recon 2: CHEST",
}


def test_descriptive_layout_full() -> None:
    # "/" and ":" are outside the server's character set: deleted, as the NBIA server does for the
    # Retriever; SeriesNumber is printed as the database decimal.
    assert descriptive_parts(FULL) == [
        "LIDC-IDRI", "LIDC-IDRI-0001", "01-01-2000-5-CHESTABD PELVIS-30178", "3000566.000000-Recon 2 CHEST-03192"]
    assert str(series_path(FULL, "descriptive")) == (
        "LIDC-IDRI/LIDC-IDRI-0001/01-01-2000-5-CHESTABD PELVIS-30178/3000566.000000-Recon 2 CHEST-03192")


def test_descriptive_layout_leaves_empty_parts_out() -> None:
    # Empty StudyID, SeriesNumber and StudyDate parts are left out; an empty description is the
    # server's "NA" (cleanStr), as in LIDC's real "01-01-2000-NA-NA-30178/3000566.000000-NA-03192".
    fields = dict(FULL, StudyID="", StudyDescription=None, SeriesDescription="", SeriesNumber=None)
    assert descriptive_parts(fields)[2:] == ["01-01-2000-NA-30178", "NA-03192"]
    fields = {k: v for k, v in fields.items() if k != "StudyDate"}
    assert descriptive_parts(fields)[2:] == ["NA-30178", "NA-03192"]
    fields = dict(FULL, StudyID="null", StudyDate="null", SeriesNumber="null", StudyDescription="null")
    assert descriptive_parts(fields)[2:] == ["NA-30178", "Recon 2 CHEST-03192"]


def test_descriptive_layout_cuts_descriptions_to_53_characters() -> None:
    study_desc = "S" * 52 + "/" + "T" * 20                   # "/" deleted first, then the cut
    series_desc = "A/B " * 30
    parts = descriptive_parts(dict(FULL, StudyDescription=study_desc, SeriesDescription=series_desc))
    assert parts[2] == "01-01-2000-5-" + "S" * 52 + "T" + "-30178"
    assert parts[3] == "3000566.000000-" + ("AB " * 30)[:53] + "-03192"
    assert len(("AB " * 30)[:53]) == 53


@pytest.mark.parametrize("description,expected", [
    ("-", None),                     # just "-": dropped
    ("/-/", None),                   # "-" once the server deleted the "/"
    ("--", "--"),
    ("/", "NA"),                     # nothing left: the server's "NA"
    ("^^", "NA"),
    ("   ", "   "),                  # spaces are in the character set (safe_component strips them at the ends only)
    ("PET/CT HEAD & NECK CA", "PETCT HEAD  NECK CA"),
    ("Thorax^A_ThoraxRoutine (Adult)", "ThoraxAThoraxRoutine Adult"),
    ("Crâne 1,25 mm", "Crne 125 mm"),
    ("x" * 60, "x" * 53),
])
def test_descriptive_description_rules(description: str, expected: str | None) -> None:
    study = descriptive_parts(dict(FULL, StudyDescription=description))[2]
    series = descriptive_parts(dict(FULL, SeriesDescription=description))[3]
    if expected is None:
        assert (study, series) == ("01-01-2000-5-30178", "3000566.000000-03192")
    else:
        assert (study, series) == (f"01-01-2000-5-{expected}-30178", f"3000566.000000-{expected}-03192")


def test_descriptive_study_id_is_reduced_to_the_character_set() -> None:
    assert descriptive_parts(dict(FULL, StudyID="PANCREAS_0001"))[2] == "01-01-2000-PANCREAS0001-CHESTABD PELVIS-30178"
    assert descriptive_parts(dict(FULL, StudyID=None))[2] == "01-01-2000-CHESTABD PELVIS-30178"


@pytest.mark.parametrize("date", ["2000-01-31", "20000131", "01-31-2000", "01/31/2000", "2000-01-31T10:20:30",
                                  "2000-1-31", "2000-01-31 00:00:00.0"])
def test_descriptive_study_date_is_mm_dd_yyyy(date: str) -> None:
    assert descriptive_parts(dict(FULL, StudyDate=date))[2].startswith("01-31-2000-5-")


@pytest.mark.parametrize("number,expected", [
    ("3000566", "3000566.000000"), (3000566, "3000566.000000"), (2, "2.000000"), (2.0, "2.000000"),
    ("2.000000", "2.000000"), ("1.5", "1.500000"), (" 4 ", "4.000000"), ("-1", "-1.000000"),
    ("", None), (None, None), ("null", None), ("abc", "abc"), ("1e999999999", "1e999999999"), ("NaN", "NaN")])
def test_descriptive_series_number(number: object, expected: str | None) -> None:
    series = descriptive_parts(dict(FULL, SeriesNumber=number))[3]
    assert series == (f"{expected}-Recon 2 CHEST-03192" if expected else "Recon 2 CHEST-03192")


def test_descriptive_short_uids_and_missing_fields() -> None:
    parts = descriptive_parts({"SeriesInstanceUID": "1.2", "StudyInstanceUID": "7"})
    assert parts[2:] == ["NA-7", "NA-1.2"]
    path = series_path({"SeriesInstanceUID": "1.2"}, "descriptive")
    assert len(path.parts) == 4
    for part in path.parts:
        assert_safe(part)


# ---------------------------------------------------------------- the real Data Retriever's folders

# Folder names and metadata.csv rows written by the real Java Data Retriever (a copy of the shared
# real-NBIA fixture; its "source" fields say where each was found).
REAL = json.loads((Path(__file__).parent.parent / "data/real-nbia/real_retriever.json").read_text("utf-8"))


def _uid_ending(last5: str) -> str:
    """A UID ending in the five digits that are all a real folder name tells of it."""
    return f"1.3.6.1.4.1.14519.5.2.1.9999.4242.{'1' * 25}{last5}"


# The metadata each real folder came from (shared/nbia-api.md, "What the NBIA Data Retriever
# writes"); where only the last 5 digits of a UID are known, a UID ending in them.
REAL_METADATA = [
    ("LIDC-IDRI/LIDC-IDRI-0001/01-01-2000-NA-NA-30178/3000566.000000-NA-03192",
     dict(Collection="LIDC-IDRI", PatientID="LIDC-IDRI-0001", StudyDate="01-01-2000", StudyID="NA",
          StudyDescription="NA", StudyInstanceUID=STUDY_UID, SeriesNumber=3000566, SeriesDescription="NA",
          SeriesInstanceUID=SERIES_UID)),
    ("HNSCC/HNSCC-01-0001/12-01-1998-NA-PETCT HEAD  NECK CA-59359/4.000000-PET AC-04291",
     dict(Collection="HNSCC", PatientID="HNSCC-01-0001", StudyDate="12-01-1998", StudyID="NA",
          StudyDescription="PETCT HEAD  NECK CA",
          StudyInstanceUID="1.3.6.1.4.1.14519.5.2.1.1706.8040.227180113037748503185792359359",
          SeriesNumber=4, SeriesDescription="PET AC",
          SeriesInstanceUID="1.3.6.1.4.1.14519.5.2.1.1706.8040.868288851446304820044692604291")),
    ("HNSCC/HNSCC-01-0001/12-05-1998-NA-RT SIMULATION-43582/NA-28768",
     dict(Collection="HNSCC", PatientID="HNSCC-01-0001", StudyDate="12-05-1998", StudyID="NA",
          StudyDescription="RT SIMULATION",
          StudyInstanceUID="1.3.6.1.4.1.14519.5.2.1.1706.8040.141473127645431244275904143582",
          SeriesNumber=None, SeriesDescription="NA",
          SeriesInstanceUID="1.3.6.1.4.1.14519.5.2.1.1706.8040.898612621408214889027419428768")),
    ("Pancreas-CT/PANCREAS_0001/11-24-2015-PANCREAS0001-Pancreas-18957/Pancreas-99667",
     dict(Collection="Pancreas-CT", PatientID="PANCREAS_0001", StudyDate="11-24-2015", StudyID="PANCREAS0001",
          StudyDescription="Pancreas", StudyInstanceUID=_uid_ending("18957"), SeriesNumber=None,
          SeriesDescription="Pancreas", SeriesInstanceUID=_uid_ending("99667"))),
    ("Lung-PET-CT-Dx/Lung_Dx-A0002/04-25-2007-ThoraxAThoraxRoutine Adult-34834/"
     "3.000000-ThoraxRoutine  8.0.0  B40f-10983",
     dict(Collection="Lung-PET-CT-Dx", PatientID="Lung_Dx-A0002", StudyDate="04-25-2007", StudyID=None,
          StudyDescription="ThoraxAThoraxRoutine Adult", StudyInstanceUID=_uid_ending("34834"), SeriesNumber=3,
          SeriesDescription="ThoraxRoutine  8.0.0  B40f", SeriesInstanceUID=_uid_ending("10983"))),
]


@pytest.mark.parametrize("expected,fields", REAL_METADATA,
                         ids=[p.split("/")[0] + "-" + p[-5:] for p, _ in REAL_METADATA])
def test_descriptive_layout_reproduces_real_retriever_folders(expected: str, fields: dict) -> None:
    assert str(series_path(fields, "descriptive")) == expected
    # and assign_paths, the engine's way in, neither renames nor suffixes them
    uid = fields["SeriesInstanceUID"]
    assert assign_paths([(uid, fields)], "descriptive") == {uid: expected}


def test_real_retriever_fixture_is_the_one_tested() -> None:
    # The expected names above are copied from the shared fixture: keep them in step with it.
    assert sorted(p["path"] for p in REAL["paths"]) == sorted(p for p, _ in REAL_METADATA)


def test_descriptive_layout_with_raw_v4_values() -> None:
    # What v4 getSeries/getPatientStudy send (raw text, null keys left out, v2-era dates) gives the
    # Retriever's folder for the same series.
    fields = dict(Collection="HNSCC", PatientID="HNSCC-01-0001", StudyDate="1998-12-01 00:00:00.0", StudyID="NA",
                  StudyDescription="PET/CT HEAD & NECK CA", StudyInstanceUID=REAL_METADATA[1][1]["StudyInstanceUID"],
                  SeriesNumber="4", SeriesDescription="PET AC",
                  SeriesInstanceUID=REAL_METADATA[1][1]["SeriesInstanceUID"])
    assert str(series_path(fields, "descriptive")) == REAL_METADATA[1][0]
    lidc = {k: v for k, v in REAL_METADATA[0][1].items() if k not in ("StudyDescription", "SeriesDescription")}
    assert str(series_path(lidc, "descriptive")) == REAL_METADATA[0][0]


@FAST
@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9 .-]{0,51}[A-Za-z0-9]", fullmatch=True),
       st.from_regex(r"[A-Za-z0-9][A-Za-z0-9 .-]{0,51}[A-Za-z0-9]", fullmatch=True),
       st.one_of(st.none(), st.integers(min_value=0, max_value=10 ** 9)))
def test_retriever_names_that_are_safe_are_kept(study_desc: str, series_desc: str, number: int | None) -> None:
    # A name the Retriever writes that is already safe (runs of spaces included) is not changed.
    fields = dict(FULL, StudyDescription=study_desc, SeriesDescription=series_desc, SeriesNumber=number)
    parts = descriptive_parts(fields)
    if any(p.split(".")[0].rstrip(" ").upper() in RESERVED for p in parts):
        return
    assert [str(p) for p in series_path(fields, "descriptive").parts] == parts
    assert study_desc in parts[2] and series_desc in parts[3]


# ---------------------------------------------------------------- classic, flat, templates

def test_classic_layout() -> None:
    assert str(series_path(FULL, "classic")) == f"LIDC-IDRI/LIDC-IDRI-0001/{STUDY_UID}/{SERIES_UID}"


def test_tcia2026_layout_is_collection_patient_study_series() -> None:
    assert str(series_path(FULL, "tcia2026")) == f"LIDC-IDRI/LIDC-IDRI-0001/{STUDY_UID}/{SERIES_UID}"


def test_flat_layout() -> None:
    assert str(series_path(FULL, "flat")) == SERIES_UID


def test_template_layout() -> None:
    fields = dict(FULL, Modality="CT", StudyDate="2000-01-01")
    template = "{Collection}/{PatientID}/{StudyDate}-{StudyDescription}/{Modality}-{SeriesNumber}-{SeriesInstanceUID}"
    assert check_layout(template) == template
    assert series_parts(fields, template) == [
        "LIDC-IDRI", "LIDC-IDRI-0001", "2000-01-01-CHEST/ABD PELVIS", f"CT-3000566-{SERIES_UID}"]
    assert str(series_path(fields, template)) == (
        f"LIDC-IDRI/LIDC-IDRI-0001/2000-01-01-CHEST-ABD PELVIS/CT-3000566-{SERIES_UID}")


def test_template_literal_braces_and_missing_fields() -> None:
    template = "{{raw}}/{Modality}{BodyPartExamined}"
    assert check_layout(template) == template
    assert series_parts({"Modality": "CT"}, template) == ["{raw}", "CT"]
    assert str(series_path({}, "{Modality}")) == "_"


@FAST
@given(st.dictionaries(st.sampled_from(["Collection", "PatientID", "StudyInstanceUID", "StudyDate", "StudyID",
                                        "StudyDescription", "SeriesInstanceUID", "SeriesNumber",
                                        "SeriesDescription", "Modality"]),
                       st.one_of(st.text(), st.integers(), st.floats(), st.none(),
                                 st.sampled_from(["../../x", "..", "/", "/etc", "\x00", "C:\\", "x" * 500]))),
       st.sampled_from(["classic", "descriptive", "tcia2026", "flat",
                        "{Collection}/{PatientID}/{StudyDate}-{StudyDescription}/{Modality}-{SeriesNumber}"]))
def test_series_path_is_relative_and_made_of_safe_parts(fields: dict, layout: str) -> None:
    path = series_path(fields, layout)
    expected_depth = {"classic": 4, "descriptive": 4, "tcia2026": 4, "flat": 1}.get(layout, 4)
    assert len(path.parts) == expected_depth
    assert not path.is_absolute()
    for part in path.parts:
        assert_safe(part)


# ---------------------------------------------------------------- check_layout

@pytest.mark.parametrize("name", ["classic", "descriptive", "tcia2026", "flat", "{SeriesInstanceUID}",
                                  "{Collection}/{PatientID}/{SeriesInstanceUID}", "data-{Collection}/x"])
def test_check_layout_accepts(name: str) -> None:
    assert check_layout(name) == name


@pytest.mark.parametrize("layout,needle", [
    ("classical", "unknown layout"),
    ("Classic", "unknown layout"),
    ("", "unknown layout"),
    ("{Collection}/{Colour}", "{Colour}"),
    ("{collection}", "{collection}"),
    ("{}", "unknown field"),
    ("{0}", "unknown field"),
    ("{Collection.__class__}", "unknown field"),
    ("{Collection[0]}", "unknown field"),
    ("/{Collection}", "relative"),
    ("/abs/{Collection}", "relative"),
    ("{Collection}/../{PatientID}", "relative"),
    ("../{Collection}", "relative"),
    ("{Collection}/..", "relative"),
    ("./{Collection}", "relative"),
    ("{Collection}//{PatientID}", "relative"),
    ("{Collection}/", "relative"),
    ("{Collection", "malformed"),
    ("{Collection}}", "malformed"),
    # format specs and conversions would fail (or allocate without bound) when applied to archive values
    ("{SeriesNumber:d}", "{SeriesNumber:d}"),
    ("{Collection:>999999999999}", "Collection"),
    ("{Collection!r}", "Collection"),
])
def test_check_layout_rejects(layout: str, needle: str) -> None:
    with pytest.raises(UsageError) as info:
        check_layout(layout)
    assert needle in str(info.value)


def test_every_accepted_template_formats() -> None:
    for template in ("{SeriesNumber:d}", "{Collection:>999999999999}", "{PatientID!r}", "{StudyDate:%Y}"):
        try:
            check_layout(template)
        except UsageError:
            continue
        series_path(FULL, template)      # accepted: must then work for any archive value


# ---------------------------------------------------------------- assign_paths

def fields_for(uid: str, **extra: object) -> dict:
    return {"Collection": "C", "PatientID": "P", "StudyInstanceUID": "1.2", "SeriesInstanceUID": uid, **extra}


def check_no_sharing_or_nesting(paths: dict[str, str]) -> None:
    folders = list(paths.values())
    assert len(set(folders)) == len(folders), folders
    as_set = set(folders)
    for folder in folders:
        pure = PurePosixPath(folder)
        assert not pure.is_absolute() and ".." not in pure.parts
        for parent in pure.parents:
            assert str(parent) not in as_set, (folder, parent)


def test_assign_paths_plain() -> None:
    items = [("1.1", fields_for("1.1")), ("1.2", fields_for("1.2"))]
    assert assign_paths(items, "classic") == {"1.1": "C/P/1.2/1.1", "1.2": "C/P/1.2/1.2"}


def test_assign_paths_collision_gets_a_stable_suffix_from_the_uid() -> None:
    # Same SeriesNumber and description: the descriptive folders would be equal except for the
    # last 5 characters of the UID, which collide here.
    a, b = "1.2.3.11111", "1.2.4.11111"
    items = [(a, fields_for(a, SeriesNumber=1)), (b, fields_for(b, SeriesNumber=1))]
    paths = assign_paths(items, "descriptive")
    check_no_sharing_or_nesting(paths)
    assert paths[a] == "C/P/NA-1.2/1.000000-NA-11111"
    assert paths[b].startswith("C/P/NA-1.2/1.000000-NA-11111~")
    assert assign_paths(list(reversed(items)), "descriptive")[a].startswith("C/P/NA-1.2/1.000000-NA-11111~")
    assert assign_paths(items, "descriptive") == paths             # deterministic


def test_assign_paths_keeps_taken_paths() -> None:
    taken = {"1.1": "old/place/for/1.1", "9.9": "C/P/1.2/1.2"}
    items = [("1.1", fields_for("1.1")), ("1.2", fields_for("1.2")), ("1.3", fields_for("1.3"))]
    paths = assign_paths(items, "classic", taken)
    assert paths["1.1"] == "old/place/for/1.1"
    assert paths["1.2"] != "C/P/1.2/1.2"                 # held by a finished series of an earlier run
    assert paths["1.3"] == "C/P/1.2/1.3"
    assert "9.9" not in paths
    check_no_sharing_or_nesting({**paths, "9.9": taken["9.9"]})


def test_assign_paths_never_nests_in_a_taken_folder() -> None:
    # A resumed run with another layout: a flat folder of the earlier run is a prefix of the
    # classic path now. The new series must not land inside it (and the call must finish).
    taken = {"0.1": "C"}
    items = [("1.1", fields_for("1.1")), ("1.2", fields_for("1.2"))]
    paths = assign_paths(items, "classic", taken)
    check_no_sharing_or_nesting({**paths, "0.1": "C"})


def test_assign_paths_never_contains_a_taken_folder() -> None:
    taken = {"0.1": "C/P/1.2/1.1/deeper"}
    paths = assign_paths([("1.1", fields_for("1.1"))], "classic", taken)
    check_no_sharing_or_nesting({**paths, "0.1": taken["0.1"]})


HOSTILE = st.one_of(st.sampled_from(["../../x", "..", ".", "", "/", "/etc/passwd", "\x00", "a\x00b", "x" * 300,
                                     "CON", "C:\\evil", "same", "SAME", " same ", "C", "P", "_"]),
                    st.text(max_size=30))


@settings(FAST, max_examples=100)
@given(st.lists(st.tuples(st.from_regex(r"[1-9][0-9]{0,3}(\.[0-9]{1,3}){1,3}", fullmatch=True),
                          st.fixed_dictionaries({}, optional={
                              k: HOSTILE for k in ("Collection", "PatientID", "StudyInstanceUID", "StudyDate",
                                                   "StudyDescription", "SeriesNumber", "SeriesDescription",
                                                   "Modality")})),
                min_size=1, max_size=12, unique_by=lambda t: t[0]),
       st.sampled_from(["classic", "descriptive", "flat", "{Collection}/{Modality}",
                        "{Modality}", "{PatientID}/{SeriesDescription}"]),
       st.dictionaries(st.from_regex(r"9\.[0-9]{1,3}", fullmatch=True),
                       st.sampled_from(["C", "C/P", "x/y/z", "_", "same", "_/_", "_/_/_/_", "..-..-x"]), max_size=3))
def test_assign_paths_unique_and_never_nested(items: list, layout: str, taken: dict) -> None:
    # Taken folders of an earlier run must themselves be disjoint for the guarantee to hold.
    disjoint: dict[str, str] = {}
    for uid, folder in taken.items():
        trial = {**disjoint, uid: folder}
        try:
            check_no_sharing_or_nesting(trial)
        except AssertionError:
            continue
        disjoint = trial
    paths = assign_paths(items, layout, disjoint)
    assert set(paths) == {uid for uid, _ in items}
    check_no_sharing_or_nesting({**paths, **disjoint})
    for uid, folder in paths.items():
        for part in PurePosixPath(folder).parts:
            assert_safe(part)


# ---------------------------------------------------------------- instance file names

@pytest.mark.parametrize("entry,expected", [("00000001.dcm", "00000001.dcm"), ("1-001.dcm", "1-001.dcm"),
                                            ("sub/dir/1-01.dcm", "1-01.dcm"), ("con.dcm", "_con.dcm")])
def test_instance_filename(entry: str, expected: str) -> None:
    assert instance_filename(entry) == expected


def test_folders_differing_only_in_case_do_not_share_a_folder():
    from harvester.store.layout import assign_paths

    paths = assign_paths([("1.1", {"PatientID": "abc"}), ("1.2", {"PatientID": "ABC"})], "{PatientID}")
    assert paths["1.1"].casefold() != paths["1.2"].casefold()


@FAST
@given(st.one_of(st.none(), st.text(max_size=120)), st.one_of(st.none(), st.text(max_size=120)))
def test_descriptions_are_always_in_the_servers_character_set(study_desc: str | None, series_desc: str | None) -> None:
    fields = dict(FULL, StudyDescription=study_desc, SeriesDescription=series_desc, SeriesNumber=None)
    study, series = descriptive_parts(fields)[2:]
    study_part = study[len("01-01-2000-5-"):-len("-30178")] if study != "01-01-2000-5-30178" else ""
    series_part = series[:-len("-03192")] if series != "03192" else ""
    for part in (study_part, series_part):
        assert re.fullmatch(r"[A-Za-z0-9 .-]{0,53}", part), part
        assert part != "-"
    if study_desc is None or not re.sub(r"[^A-Za-z0-9 .-]", "", study_desc):
        assert study_part == "NA"


# ---------------------------------------------------------------- a rerun over an older tree

OLD_DESCRIPTIVE = "{Collection}/{PatientID}/{StudyDate}-{StudyDescription}/{SeriesNumber}-{SeriesDescription}"


def test_rerun_over_a_tree_with_older_names_fetches_nothing_and_moves_nothing(server, small_archive, tmp_path):
    # A tree harvested before the descriptive names changed (SeriesNumber "3", descriptions with
    # characters outside the server's set) is a harvest.json of other folders: a rerun with today's
    # descriptive layout keeps every recorded folder and downloads nothing.
    from harvest_helpers import assert_identical, harvest, manifest, normal_series, select_all

    out = tmp_path / "out"
    assert harvest(server.base_url, out, select_all(small_archive), layout=OLD_DESCRIPTIVE).ok
    recs = manifest(out)["series"]
    before = {r["SeriesInstanceUID"]: r["path"] for r in recs}
    now = assign_paths([(r["SeriesInstanceUID"], {**r["metadata"], **(r["study"] or {}), **r}) for r in recs],
                       "descriptive")
    assert all(now[uid] != path for uid, path in before.items())        # the names really differ
    downloads = sum(server.stats.downloads.values())

    # another layout than the one recorded: refused unless forced (--force keeps the records)
    result = harvest(server.base_url, out, select_all(small_archive), layout="descriptive", force=True)
    assert result.ok and result.downloaded == 0 and result.skipped == len(before)
    assert sum(server.stats.downloads.values()) == downloads
    doc = manifest(out)
    assert {r["SeriesInstanceUID"]: r["path"] for r in doc["series"]} == before
    assert doc["layout"] == "descriptive"
    assert_identical(out, small_archive, normal_series(small_archive))
