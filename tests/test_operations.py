"""Composition rules of harvester.operations that need no server: which source a harvest's
own record asks for (sync and repair use it), and what harvest.json's header records."""
from __future__ import annotations

from pathlib import Path

from harvester.config import Config
from harvester.operations import manifest_header, recorded_config, recorded_header
from harvester.query import query_from_dict
from harvester.store.state import HarvestState


def test_a_harvest_of_another_kind_is_worked_on_with_its_own_kind_and_url() -> None:
    config = Config(api_url="https://services.example/nbia-api/services/v4")
    got = recorded_config(config, {"source": {"kind": "dicomweb", "url": "https://pacs.example/dicom-web"},
                                   "api_url": "https://pacs.example/dicom-web"})
    assert (got.source, got.api_url) == ("dicomweb", "https://pacs.example/dicom-web")


def test_the_same_kind_keeps_the_callers_url_and_its_credentials() -> None:
    config = Config(source="dicomweb", api_url="https://bob:s3cret@pacs.example/dicom-web")
    assert recorded_config(config, {"source": {"kind": "dicomweb", "url": "https://pacs.example/dicom-web"}}) is config


def test_an_older_file_without_a_source_leaves_the_callers_config() -> None:
    """Files written before the source was recorded: the caller's kind decides (NBIA unless it
    names another), so an older DICOMweb harvest repaired with --source dicomweb stays DICOMweb."""
    nbia = Config(api_url="https://services.example/nbia-api/services/v4")
    assert recorded_config(nbia, {"api_url": "https://old.example/v4"}) is nbia
    dicomweb = Config(source="dicomweb", api_url="https://pacs.example/dicom-web")
    assert recorded_config(dicomweb, {"api_url": "https://pacs.example/dicom-web"}) is dicomweb
    assert recorded_config(dicomweb, {"source": "dicomweb?", "api_url": "https://x.example"}) is dicomweb


def test_sync_reads_the_header_of_the_harvest_it_syncs(tmp_path: Path) -> None:
    (tmp_path / "harvest.json").write_text(
        '{"api_url": "https://pacs.example/dw", "source": {"kind": "dicomweb", "url": "https://pacs.example/dw"},'
        ' "series": [], "totals": {}}')
    assert recorded_header(tmp_path) == {"api_url": "https://pacs.example/dw",
                                         "source": {"kind": "dicomweb", "url": "https://pacs.example/dw"}}
    assert recorded_header(tmp_path / "nothing-here") == {}
    (tmp_path / "harvest.json").write_text("{broken")
    assert recorded_header(tmp_path) == {}


def test_the_header_records_kind_and_url_without_credentials(tmp_path: Path) -> None:
    config = Config(source="dicomweb", api_url="https://bob:s3cret@pacs.example/dicom-web?access_token=t0k")
    query = query_from_dict({"select": [{"patients": ["P1"]}]}, origin="t")
    header = manifest_header(config, query, HarvestState(tmp_path))
    assert header["source"]["kind"] == "dicomweb"
    assert header["source"]["url"] == header["api_url"]
    assert "s3cret" not in str(header) and "t0k" not in str(header) and "bob" not in str(header)
    assert header["source"]["url"].startswith("https://pacs.example/dicom-web")
