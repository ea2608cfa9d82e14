"""The one harvest.json reader: the same broken file fails the same way for every caller, and
the archive a harvest came from is read from files of every version."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harvester.api import verify_tree
from harvester.errors import ManifestError, UsageError
from harvester.store.tree import read_status
from harvester.report import render_report
from harvester.store.manifest import read_manifest, recorded_source


def test_a_harvest_json_of_today_round_trips(tmp_path: Path) -> None:
    doc = {"api_url": "https://x.example/v4", "source": {"kind": "dicomweb", "url": "https://pacs.example/dw"},
           "series": [{"SeriesInstanceUID": "1.2"}]}
    (tmp_path / "harvest.json").write_text(json.dumps(doc))
    assert read_manifest(tmp_path) == doc
    assert recorded_source(doc) == ("dicomweb", "https://pacs.example/dw")


def test_files_written_before_the_source_was_recorded_are_nbia_at_api_url() -> None:
    assert recorded_source({"api_url": "https://services.cancerimagingarchive.net/nbia-api/services/v4"}) == (
        "nbia", "https://services.cancerimagingarchive.net/nbia-api/services/v4")
    assert recorded_source({}) == ("nbia", None)


@pytest.mark.parametrize("source", [
    "dicomweb", ["dicomweb"], {"kind": "ftp", "url": "https://a"}, {"kind": None}, {"kind": {"x": 1}},
    {"kind": "nbia", "url": "javascript:alert(1)"}, {"kind": "nbia", "url": "https://a\n/evil"},
    {"kind": "nbia", "url": 12},
])
def test_a_hostile_source_entry_falls_back_to_what_older_files_meant(source: object) -> None:
    kind, url = recorded_source({"api_url": "https://ok.example/v4", "source": source})
    assert kind in ("nbia", "dicomweb")
    assert url == "https://ok.example/v4"


BROKEN = {
    "not json": b"{not json",
    "not utf-8": b'{"series": ["\xff"]}',
    "too deep": b"[" * 100_000 + b"]" * 100_000,
    "not an object": b"[1, 2]",
    "series not a list": b'{"series": {"a": 1}}',
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_every_reader_refuses_a_broken_file_the_same_way(tmp_path: Path, name: str) -> None:
    (tmp_path / "harvest.json").write_bytes(BROKEN[name])
    messages = set()
    for reader in (read_manifest, read_status, render_report, verify_tree):
        with pytest.raises(ManifestError) as info:
            reader(tmp_path)
        messages.add(str(info.value))
    assert len(messages) == 1, messages
    assert "harvest.json" in messages.pop()


def test_a_missing_file_is_a_usage_error_for_every_reader(tmp_path: Path) -> None:
    for reader in (read_manifest, read_status, render_report, verify_tree):
        with pytest.raises(UsageError, match="holds no harvest.json"):
            reader(tmp_path)


def test_a_link_or_a_fifo_is_never_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text('{"series": []}')
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "harvest.json").symlink_to(target)
    with pytest.raises(ManifestError):
        read_manifest(tmp_path / "out")
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "harvest.json")
    with pytest.raises(ManifestError):
        read_manifest(tmp_path / "fifo")
