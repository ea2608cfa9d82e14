"""Series folders assigned through a database (``store.db.FolderIndex``), not a set in memory:
the same folders as the in-memory assignment, unique and never nested, and a resume that skips
complete series by index and keeps their folders."""
from __future__ import annotations

from pathlib import PurePosixPath

from hypothesis import given, settings
from hypothesis import strategies as st

from harvest_helpers import harvest, normal_series, select_all
from harvester.store.db import FolderIndex
from harvester.store.layout import assign_paths, name_key
from harvester.store.state import HarvestState


def _fields(uid: str, collection: str = "C", patient: str = "P", study: str = "S", number: str = "1",
            description: str = "CT") -> dict[str, str]:
    return {"SeriesInstanceUID": uid, "Collection": collection, "PatientID": patient, "StudyInstanceUID": study,
            "StudyDate": "2001-02-03", "SeriesNumber": number, "SeriesDescription": description}


def test_two_series_that_would_share_a_folder_get_two(tmp_path):
    # the same last five UID digits, number and description: one descriptive folder for both
    items = [("1.2.3.12345", _fields("1.2.3.12345")), ("1.2.4.12345", _fields("1.2.4.12345"))]
    with FolderIndex(tmp_path / "folders.db") as folders:
        paths = assign_paths(items, "descriptive", folders=folders)
        assert folders.is_folder(paths["1.2.3.12345"]) and folders.clashes(paths["1.2.4.12345"].upper())
    first, second = paths["1.2.3.12345"], paths["1.2.4.12345"]
    assert PurePosixPath(first).parent == PurePosixPath(second).parent and first != second
    assert second.startswith(first + "~")
    assert paths == assign_paths(items, "descriptive")   # the in-memory assignment's folders
    assert not (tmp_path / "folders.db").exists()


def test_a_recorded_folder_is_kept_and_nothing_nests_in_it(tmp_path):
    taken = {"1.9": "C/P"}   # an earlier run's (another layout's) series folder on this one's way
    items = [("1.9", _fields("1.9")), ("1.1", _fields("1.1")), ("1.2", _fields("1.2", collection="c", patient="p"))]
    with FolderIndex(tmp_path / "folders.db") as folders:
        paths = assign_paths(items, "classic", taken, folders=folders)
    assert paths["1.9"] == "C/P"
    keys = [name_key(p) for p in paths.values()]
    assert len(set(keys)) == 3
    for a in keys:
        assert not any(b != a and b.startswith(a + "/") for b in keys)
    assert paths == assign_paths(items, "classic", taken)


_part = st.sampled_from(["A", "a", "B", "x y", "é", "NUL", ".."])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_part, _part, _part, st.sampled_from(["1", "2"])), min_size=1, max_size=12),
       st.sampled_from(["classic", "descriptive", "{Collection}/{PatientID}", "{Collection}"]))
def test_the_database_assigns_what_memory_assigns(tmp_path_factory, rows, layout):
    items = [(f"1.2.{n}", _fields(f"1.2.{n}", c, p, s, num)) for n, (c, p, s, num) in enumerate(rows)]
    with FolderIndex(tmp_path_factory.mktemp("f") / "folders.db") as folders:
        assert assign_paths(items, layout, folders=folders) == assign_paths(items, layout)


def test_a_stale_scratch_file_or_a_link_there_is_replaced_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep me")
    (tmp_path / "folders.db").symlink_to(target)
    with FolderIndex(tmp_path / "folders.db") as folders:
        folders.add("C/P/S")
        assert folders.clashes("C/P") and folders.clashes("C/P/S/inner") and not folders.clashes("C/Q")
    assert target.read_bytes() == b"keep me" and not (tmp_path / "folders.db").exists()


def test_a_resume_skips_complete_series_by_index_and_keeps_their_folders(server, small_archive, tmp_path):
    uids = normal_series(small_archive)[:3]
    out = tmp_path / "out"
    first = harvest(server.base_url, out, {"select": [{"series": uids}]})
    assert first.ok and first.downloaded == 3
    state = HarvestState(out)
    state.open()
    try:   # what the next run's engine asks: one lookup per series
        assert all(state.completed_bytes(u) for u in uids)
        folders = state.taken_paths()
        assert state.assign_paths([(u, {"SeriesInstanceUID": u}) for u in uids], "flat") == folders
    finally:
        state.close()
    downloads = dict(server.stats.downloads)
    again = harvest(server.base_url, out, select_all(small_archive) | {"select": [{"series": uids}]})
    assert again.ok and again.downloaded == 0 and again.skipped == 3
    assert dict(server.stats.downloads) == downloads and not (out / ".harvester" / "folders.db").exists()
