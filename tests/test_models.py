"""SeriesRecord: every record harvest.json has held reads into the typed record and back, key
for key, and gives the task that fetches its series again."""
from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harvester.models import SeriesRecord
from harvester.store.state import record_problem

#: a record as this version's engine writes it
TODAY = {
    "SeriesInstanceUID": "1.2.3", "Collection": "LIDC-IDRI", "PatientID": "P-1", "StudyInstanceUID": "1.2",
    "Modality": "CT", "status": "complete", "path": "LIDC-IDRI/P-1/s/1", "bytes": 1024, "attempts": 1,
    "error": None, "completed": "2026-01-01T00:00:00.000Z", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
    "files": [{"path": "LIDC-IDRI/P-1/s/1/1-1.dcm", "size": 1024, "md5": "0" * 32, "SOPInstanceUID": "1.2.3.4"}],
    "metadata": {"ImageCount": "1", "FileSize": 1024.0, "SeriesNumber": 3}, "patient": None,
    "study": {"StudyDate": "2001-01-01"}, "annotations": [], "files_without_md5": 0,
}
#: earlier versions: no attempts, error_kind, sop_class_uid, patient, study; a failed one
OLDER = [
    {k: v for k, v in TODAY.items() if k not in ("attempts", "sop_class_uid", "patient", "study", "annotations",
                                                 "files_without_md5")},
    {"SeriesInstanceUID": "9.9", "status": "failed", "error": "HTTP 500", "error_kind": "RetryableRequestError",
     "files": []},
    {"SeriesInstanceUID": "8.8", "status": "unavailable", "origin": "cart.tcia", "reason": "no row"},
]


@pytest.mark.parametrize("rec", [TODAY, *OLDER], ids=["today", "older", "failed", "unavailable"])
def test_records_of_every_version_round_trip(rec: dict[str, Any]) -> None:
    assert record_problem(rec) is None
    typed = SeriesRecord.from_json(rec)
    assert typed.series_uid == rec["SeriesInstanceUID"]
    assert typed.to_json() == rec


def test_the_task_of_a_record() -> None:
    task = SeriesRecord.from_json(TODAY).task()
    assert (task.series_uid, task.collection, task.patient_id, task.study_uid) == ("1.2.3", "LIDC-IDRI", "P-1", "1.2")
    assert (task.image_count, task.file_size) == (1, 1024)
    assert task.row == TODAY["metadata"] and task.study == TODAY["study"]
    bare = SeriesRecord.from_json({"SeriesInstanceUID": "7", "bytes": 5, "files": [{"path": "a", "size": 5,
                                                                                   "md5": "x"}]}).task()
    assert (bare.image_count, bare.file_size, bare.collection, bare.row) == (1, 5, "", {})


@pytest.mark.parametrize("rec", [{}, {"SeriesInstanceUID": ""}, {"SeriesInstanceUID": 5}, [], "1.2"])
def test_a_record_without_a_uid_is_refused(rec: Any) -> None:
    with pytest.raises(ValueError):
        SeriesRecord.from_json(rec)


json_leaf = st.none() | st.booleans() | st.integers(0, 2**40) | st.text(max_size=8)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
records = st.fixed_dictionaries(
    {"SeriesInstanceUID": st.text(min_size=1, max_size=20)},
    optional={"Collection": st.text(max_size=8), "PatientID": st.text(max_size=8),
              "StudyInstanceUID": st.text(max_size=8), "Modality": st.text(max_size=4),
              "status": st.sampled_from(["failed", "unavailable", "pending"]) | st.none(),
              "bytes": st.integers(0, 2**40) | st.none(), "attempts": st.integers(0, 9) | st.none(),
              "error": st.text(max_size=20) | st.none(), "error_kind": st.text(max_size=8) | st.none(),
              "metadata": st.dictionaries(st.text(max_size=8), json_value, max_size=4),
              "files": st.lists(st.fixed_dictionaries({"path": st.text(max_size=8), "size": st.integers(0, 99),
                                                       "md5": st.text(max_size=32)}), max_size=3),
              "annotations": json_value, "later_version_key": json_value})


@settings(max_examples=200, deadline=None)
@given(records)
def test_any_usable_record_round_trips(rec: dict[str, Any]) -> None:
    if record_problem(rec) is not None:
        return
    assert SeriesRecord.from_json(rec).to_json() == rec
