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


# ---------------------------------------------------------------- a first run interrupted while DIR opens

def _open_then(raise_after: BaseException):  # type: ignore[no-untyped-def]
    """HarvestState.open as it is, then the interruption a Ctrl-C delivers when the thread the
    state opened in is done (anyio does not abandon it, so the await raises after the lock)."""
    real = HarvestState.open

    def open_and_interrupt(self: HarvestState, **options: bool) -> None:   # (recover=False: a run's)
        real(self, **options)
        raise raise_after

    return open_and_interrupt


def test_ctrl_c_while_the_state_opens_leaves_no_directory(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import anyio
    import pytest

    from harvester.operations import open_harvest

    monkeypatch.setattr(HarvestState, "open", _open_then(KeyboardInterrupt()))
    out = tmp_path / "a" / "b" / "out"

    async def run() -> None:
        async with open_harvest(Config(out_dir=out, progress=False)):
            raise AssertionError("never reached: the open was interrupted")

    with pytest.raises(KeyboardInterrupt):
        anyio.run(run)
    assert not (tmp_path / "a").exists()


def test_a_first_run_that_finds_dir_locked_removes_nothing_of_the_other_run(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Two first runs into one new DIR: the second cannot take the lock and must not remove what
    the first (which holds it) has made."""
    import anyio
    import pytest

    from harvester.errors import FatalError
    from harvester.operations import open_harvest

    out = tmp_path / "new" / "out"

    async def run() -> None:
        async with open_harvest(Config(out_dir=out, progress=False)):
            raise AssertionError("never reached: DIR is locked")

    first = HarvestState(out)
    out.mkdir(parents=True)
    first.open()
    try:
        # the second run began before the first made DIR: it thinks it creates tmp_path/new
        import harvester.operations as operations
        monkeypatch.setattr(operations, "_missing_folders", lambda path: [out, out.parent])
        with pytest.raises(FatalError, match="another harvester is running"):
            anyio.run(run)
        assert (out / ".harvester" / "lock").exists() and first.locked
    finally:
        first.close()
