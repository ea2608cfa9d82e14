"""Dates as the archives send them, read in every format the NBIA API has used.

A leaf module (no harvester imports), shared by the planner, the layouts, the sync logic and
the server, so that one date is read the same way everywhere.

Formats seen on the wire (``shared/nbia-api.md``, "The wire, byte for byte"):

* v4 JSON (2026): ``MM-DD-YYYY`` (``"05-27-2015"``) for SeriesDate, StudyDate, DateReleased,
  MaxSubmissionTimestamp;
* v1/v2-era JSON: ``YYYY-MM-DD HH:MM:SS.f`` (``"2003-12-12 00:00:00.0"``) or plain ISO;
* DICOM (DICOMweb, file headers): ``YYYYMMDD``;
* ``MM/DD/YYYY`` from hand-made spreadsheets and older portal exports.

``DD/MM/YYYY`` is only ever a *request* parameter (v1/v2 ``fromDate``), never a response
value, so slashes read month first.
"""
from __future__ import annotations

import datetime as dt
import re
from typing import Any

_MDY = re.compile(r"^(\d{1,2})[-/](\d{1,2})[-/](\d{4})\b")
_ISO = re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2})(?:$|[ T])")
_DICOM = re.compile(r"^(\d{4})(\d{2})(\d{2})(?:$|\d)")


def parse_archive_date(value: Any) -> dt.date | None:
    """The date in ``value`` (any format above), or None when it is absent or unreadable.

    Never raises: values come from a server and are untrusted.
    """
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if not isinstance(value, str):
        return None
    text = value.strip()
    for pattern, order in ((_ISO, (0, 1, 2)), (_MDY, (2, 0, 1)), (_DICOM, (0, 1, 2))):
        match = pattern.match(text)
        if match:
            year, month, day = (int(match.group(i + 1)) for i in order)
            try:
                return dt.date(year, month, day)
            except ValueError:
                return None
    return None


def nbia_date(value: dt.date) -> str:
    """``MM-DD-YYYY``: how v4 sends dates and how the Data Retriever writes them in folder names."""
    return value.strftime("%m-%d-%Y")
