"""The TCIA-shaped metadata backend (``harvester.server.tciaindex``): a small index in the real
``idc_index`` schema, served over loopback and planned as ``harvester plan`` plans all of TCIA."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from harvest_helpers import test_config  # noqa: E402
from index_helpers import write_index  # noqa: E402
from harvester.api import aplan  # noqa: E402
from harvester.query import query_from_dict  # noqa: E402
from harvester.server.tciaindex import REFUSAL, TciaIndexArchive, main  # noqa: E402
from harvester.server.testing import serve_in_thread  # noqa: E402

#: collection_id -> (TCIA's name, series of original TCIA rows)
COLLECTIONS = {"nlst": ("NLST", 180), "lidc_idri": ("LIDC-IDRI", 60), "tcga_brca": ("TCGA-BRCA", 20)}


def _row(cid: str, n: int, **over: Any) -> dict[str, Any]:
    c = sum(map(ord, cid))   # one number per collection id
    patient, study = f"{cid.upper()}-{n // 6:04d}", f"1.2.3.{c}.{n // 3}"
    row = {"collection_id": cid, "analysis_result_id": None, "PatientID": patient,
           "SeriesInstanceUID": f"1.2.826.0.1.{c}.{n}", "StudyInstanceUID": study,
           "source_DOI": f"10.7937/tcia.{cid}", "PatientAge": "060Y", "PatientSex": "M",
           "StudyDate": "2001-02-03", "StudyDescription": "CHEST^CT", "BodyPartExamined": "CHEST",
           "Modality": "CT" if n % 4 else "SEG", "Manufacturer": "ACME", "ManufacturerModelName": "Scan/9",
           "SeriesDate": "2001-02-03", "SeriesDescription": f"lung {n % 7}", "SeriesNumber": str(n % 9),
           "license_short_name": "CC BY 4.0", "aws_bucket": "idc-open-data", "instanceCount": 10 + n,
           "series_init_idc_version": 1, "series_revised_idc_version": 1, "series_size_MB": (10 + n) * 0.5125}
    row.update(over)
    return row


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """A few hundred rows in the real schema: TCIA's originals, plus an analysis result and a
    non-TCIA source that the backend must leave out; TCIA's names in collections_index.parquet."""
    rows = [_row(cid, n) for cid, (_, count) in COLLECTIONS.items() for n in range(count)]
    extra = [_row("nlst", 900, analysis_result_id="nlst_seg", source_DOI="10.7937/tcia.nlst"),
             _row("cptac_x", 1, source_DOI="10.5281/zenodo.1"),
             _row("lidc_idri", 901, analysis_result_id="")]   # empty, not null: an original
    every = extra + rows   # not in collection order: the backend sorts
    names = {cid: name for cid, (name, _) in COLLECTIONS.items()}
    path = write_index(tmp_path_factory.mktemp("tcia-index") / "idc_index.parquet", every, names)
    return path, rows + [extra[2]]


@pytest.fixture(scope="module")
def served(index):
    archive = TciaIndexArchive.load(index[0])
    with serve_in_thread(archive, faults="latency=1ms") as srv:
        yield srv, archive


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_the_whole_index_is_planned_with_its_real_rows(served, index, tmp_path):
    srv, _ = served
    _, originals = index
    before = dict(srv.stats.requests)
    query = query_from_dict({"select": [{"collection": name} for name, _ in COLLECTIONS.values()]},
                            origin="test", base_dir=tmp_path)
    plan = anyio.run(lambda: aplan(query, test_config(srv.base_url, tmp_path / "out"), details=False))
    by_uid = {r["SeriesInstanceUID"]: r for r in originals}
    assert sorted(t.series_uid for t in plan.tasks) == sorted(by_uid)   # no analysis, no other source
    for task in plan.tasks:
        want = by_uid[task.series_uid]
        assert task.image_count == want["instanceCount"]
        assert task.file_size == round(want["series_size_MB"] * 1_000_000)
        assert task.collection == COLLECTIONS[want["collection_id"]][0]
        assert (task.patient_id, task.study_uid, task.modality) == (want["PatientID"], want["StudyInstanceUID"],
                                                                     want["Modality"])
        assert task.row["SeriesDescription"] == want["SeriesDescription"]
        assert task.row["ManufacturerModelName"] == "Scan/9"
        assert task.row["DataDescriptionURI"] == f"https://doi.org/{want['source_DOI']}"
    asked = {k: v - before.get(k, 0) for k, v in srv.stats.requests.items() if v - before.get(k, 0)}
    assert asked == {"getCollectionValues": 1, "getSeries": len(COLLECTIONS)}


def test_the_planner_gets_study_and_patient_rows_for_a_harvest(served, tmp_path):
    srv, _ = served
    query = query_from_dict({"select": [{"collection": "tcga-brca", "modality": "seg"}]}, origin="test",
                            base_dir=tmp_path)
    plan = anyio.run(lambda: aplan(query, test_config(srv.base_url, tmp_path / "out")))
    assert len(plan.tasks) == 5 and {t.modality for t in plan.tasks} == {"SEG"}
    for task in plan.tasks:
        assert task.study is not None and task.study["StudyDescription"] == "CHEST^CT"
        assert task.study["SeriesCount"] == 3   # the study's series in the whole index, not in the answer
        assert task.patient is not None and task.patient["PatientId"] == task.patient_id


def test_values_lookups_and_refused_downloads(served, index):
    srv, archive = served
    status, body = _get(srv.url("getCollectionValues"))
    assert status == 200 and [r["Collection"] for r in json.loads(body)] == ["LIDC-IDRI", "NLST", "TCGA-BRCA"]
    status, body = _get(srv.url("getModalityValues") + "?Collection=nlst")
    assert status == 200 and [r["Modality"] for r in json.loads(body)] == ["CT", "SEG"]
    uid = index[1][7]["SeriesInstanceUID"]
    status, body = _get(srv.url("getSeries") + f"?SeriesInstanceUID={uid}")
    assert status == 200 and [r["SeriesInstanceUID"] for r in json.loads(body)] == [uid]
    status, body = _get(srv.url("getSeries") + "?SeriesInstanceUID=1.2.3.404")
    assert status == 200 and body == b""
    for endpoint in ("getImage", "getImageWithMD5Hash"):
        status, body = _get(srv.url(endpoint) + f"?SeriesInstanceUID={uid}")
        assert status == 400 and body.decode().strip() == REFUSAL
    status, body = _get(srv.url("getDCMImage", "v1") + f"?SeriesInstanceUID={uid}")
    assert status == 400 and body.decode().strip() == REFUSAL
    assert srv.stats.downloads == {}


def test_a_file_that_is_not_an_index_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "idc_index.parquet"
    bad.write_bytes(b"PAR1 not really")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harvester: error: ") and "not a readable parquet file" in err and "\n" not in err
    pq.write_table(pa.table({"collection_id": ["x"]}), bad)
    assert main([str(bad)]) == 2
    assert "not an IDC index" in capsys.readouterr().err
