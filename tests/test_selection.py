"""The selection rules both sources share (harvester.selection): units without I/O."""
from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from harvester.errors import UnknownSelectionError
from harvester.models import UnavailableSeries
from harvester.query import query_from_dict
from harvester.selection import matches, select_rows


def row(uid: str, collection: str = "C", patient: str = "P", **extra: Any) -> dict[str, Any]:
    return {"SeriesInstanceUID": uid, "Collection": collection, "PatientID": patient, "StudyInstanceUID": "S",
            **extra}


def query(**top: Any) -> Any:
    return query_from_dict({"select": [{"collection": "C"}, {"series": ["9.9", "2"]}], **top}, origin="t")


def test_union_dedupes_by_uid_the_first_selector_wins_and_one_order() -> None:
    first = [row("3"), row("1", patient="Z"), row("2", patient="A")]
    second = [row("2", patient="A", Modality="other")]
    got = select_rows(query(), [(first, []), (second, [])], strict=False, archive="x", hint="h")
    assert [r["SeriesInstanceUID"] for r in got.rows] == ["2", "3", "1"]   # patient A, P, Z
    assert got.rows[0] is first[2], "the first selector's row is kept"
    assert got.batches == [first, second]


def test_exclusions_rows_without_a_uid_and_the_limit() -> None:
    rows = [row(str(i)) for i in range(5)] + [{"Collection": "C"}, row("", patient="Q")]
    got = select_rows(query(exclude={"series": ["1"]}, limit=2), [(rows, [])], strict=False, archive="x", hint="h")
    assert [r["SeriesInstanceUID"] for r in got.rows] == ["0", "2"]


def test_a_listed_series_another_selector_found_is_not_unavailable() -> None:
    missing = [UnavailableSeries("2", "series", "no row"), UnavailableSeries("9.9", "series", "no row"),
               UnavailableSeries("9.9", "series", "again")]
    got = select_rows(query(), [([row("2")], []), ([], missing)], strict=False, archive="x", hint="h")
    assert [(u.series_uid, u.reason) for u in got.unavailable] == [("9.9", "no row")]
    with pytest.raises(UnknownSelectionError, match="the service has no series 9.9"):
        select_rows(query(), [([row("2")], []), ([], missing)], strict=True, archive="the service", hint="h")
    # strict with nothing unavailable plans as usual
    assert select_rows(query(), [([row("2")], [])], strict=True, archive="x", hint="h").rows


def test_matches_checks_filters_and_release_date() -> None:
    sel = query_from_dict({"select": [{"collection": "c", "modality": "CT", "released_after": "2020-01-01"}]},
                          origin="t").selectors[0]
    assert sel.released_after == dt.date(2020, 1, 1)
    assert matches(row("1", Modality="ct", DateReleased="2021-05-01"), sel)
    assert not matches(row("1", Modality="MR", DateReleased="2021-05-01"), sel)
    assert not matches(row("1", Modality="CT", DateReleased="2019-05-01"), sel)
    assert matches(row("1", Modality="CT"), sel), "an undated row is kept, not silently lost"
