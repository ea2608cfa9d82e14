"""``RowStream``: a query answer parsed as its bytes arrive gives the rows and the errors of the
answer read whole (``json_rows``), wherever the chunks are cut, with repeated values shared."""
from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harvester.errors import PermanentRequestError, RetryableRequestError
from harvester.source.nbia.client import RowStream, json_rows


def streamed(body: bytes, cuts: list[int]) -> list[dict]:
    rows = RowStream("http://x/getSeries")
    start = 0
    for cut in sorted(set(c % (len(body) + 1) for c in cuts)) + [len(body)]:
        rows.feed(body[start:cut])
        start = cut
    return rows.finish()


def outcome(read, *args):
    try:
        return "rows", read(*args)
    except (RetryableRequestError, PermanentRequestError) as err:
        return type(err).__name__, str(err).split(": ", 1)[0]


scalars = st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False) | st.text(max_size=12)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                            max_size=3), max_leaves=8)
answers = st.lists(st.dictionaries(st.sampled_from(["SeriesInstanceUID", "Collection", "Modality", "é", ""]), values,
                                   max_size=5) | scalars, max_size=8)


@settings(max_examples=150, deadline=None)
@given(answers, st.lists(st.integers(0, 10**6), max_size=12), st.sampled_from([(",", ":"), (", ", ": ")]),
       st.sampled_from(["", " ", "\n\t"]))
def test_any_array_cut_anywhere_gives_the_rows_read_whole(answer, cuts, separators, space):
    body = (space + json.dumps(answer, separators=separators, ensure_ascii=False) + space).encode()
    assert streamed(body, cuts) == json_rows(body, "http://x/getSeries")


@pytest.mark.parametrize("body", [
    b"", b"  \n", b"[]", b" [ ] ", b"null", b'{"a":1}', b'[{"a":1},]', b'[{"a":1}', b'[{"a":1}] x', b"[,]",
    b"[" * 50000 + b"]" * 50000, b'[{"a":"\xff"}]', '[{"a":"é"}]'.encode("utf-16"), b'\xef\xbb\xbf[{"a":1}]',
    b"<html>oops</html>", b'[{"a":1}][', b'[{"a":"' + b"x" * 30000 + b'"}]', b'[{"a":1e999}]',
    b'[{"a":"\xed\xa0\x80"}]', b"[1 2]", b'[12, 345, {"b": 2}]', b'[{"a":1}],[{"b":2}]', b'[{"a":1}] ,{"b":2}]',
    b'[{"a":1},{"b":[}]', b'[{"a":"}"}, {"b":2}]',
], ids=lambda b: repr(b[:16]))
@pytest.mark.parametrize("cut", [1, 3, 4096])
def test_hostile_and_odd_answers_fail_or_pass_as_read_whole(body, cut):
    whole = outcome(json_rows, body, "http://x/getSeries")
    assert outcome(streamed, body, list(range(cut, len(body), cut))) == whole


def test_repeated_values_are_one_object_per_answer():
    rows = [{"SeriesInstanceUID": f"1.2.{n}", "StudyInstanceUID": "1.2.3", "Collection": "NLST", "Modality": "CT"}
            for n in range(3)]
    got = streamed(json.dumps(rows).encode(), [7, 50, 91])
    assert got == rows
    assert got[0]["Collection"] is got[2]["Collection"] and got[0]["StudyInstanceUID"] is got[1]["StudyInstanceUID"]
    assert [next(iter(r)) for r in got] == ["SeriesInstanceUID"] * 3 and next(iter(got[0])) is next(iter(got[2]))


def test_values_are_shared_across_chunks_and_keys_within_the_rows_decoded_at_once():
    rows = [{"SeriesInstanceUID": f"1.2.{n}", "StudyInstanceUID": "1.2.3", "Collection": "NLST", "Modality": "CT",
             "ImageCount": n} for n in range(6)]
    text = json.dumps(rows).encode()
    ends = [m.end() for m in re.finditer(rb"\}", text)]
    stream, calls = RowStream("u"), []
    scan = stream._scan
    stream._scan = lambda text, pos: calls.append(pos) or scan(text, pos)
    for piece in (text[:ends[1] + 1], text[ends[1] + 1:ends[3] + 1], text[ends[3] + 1:]):
        stream.feed(piece)   # rows 0-1, 2-3 and 4-5 arrive whole in three chunks
    got = stream.finish()
    assert got == rows and len(calls) == 3   # one call of the scanner for the whole rows of each
    assert len({id(r["Collection"]) for r in got}) == 1 and len({id(r["StudyInstanceUID"]) for r in got}) == 1
    assert len({id(r["SeriesInstanceUID"]) for r in got}) == 6
    keys = [next(iter(r)) for r in got]
    assert keys[0] is keys[1] and keys[2] is keys[3] and keys[4] is keys[5]


def test_a_giant_cut_element_is_not_decoded_again_for_every_chunk(monkeypatch):
    body = b'[{"a":"' + b"x" * 1_000_000 + b'"}]'
    rows = RowStream("u")
    calls = 0
    scan = rows._scan

    def counting(text, pos):
        nonlocal calls
        calls += 1
        return scan(text, pos)

    rows._scan = counting
    for i in range(0, len(body), 1024):
        rows.feed(body[i:i + 1024])
    assert rows.finish() == [{"a": "x" * 1_000_000}]
    assert calls < 30   # about log2(1000 chunks), not 1000


def test_whole_rows_that_cannot_be_read_at_once_are_not_tried_again_for_every_row():
    """When the text up to a chunk's last ``}`` is not whole rows (here that ``}`` is in a string
    of the cut row), the rows are read one by one, without another try of the whole rest after
    each of them (which would be quadratic in the chunk)."""
    rows = [{"SeriesInstanceUID": f"1.2.{n}", "Collection": "NLST"} for n in range(50)]
    text = json.dumps(rows + [{"SeriesDescription": "a } in a cut row"}]).encode()
    cut = text.index(b"a } in") + 3
    stream, calls = RowStream("u"), []
    scan = stream._scan
    stream._scan = lambda text, pos: calls.append(pos) or scan(text, pos)
    stream.feed(text[:cut])
    assert stream.rows == rows
    assert len(calls) <= len(rows) + 3   # one try of the whole, a call per row, one of the cut row
    stream.feed(text[cut:])
    assert stream.finish() == rows + [{"SeriesDescription": "a } in a cut row"}]
