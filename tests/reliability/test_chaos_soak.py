"""Seeded chaos soak: every fault the server can inject, all at once, over 300 series.

Each seed is a different, reproducible storm (the server's fault decisions depend only on the
seed and the request). The harvest must end complete and byte-identical, and the server's
statistics must show that every kind of fault really hit it.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from harvest_helpers import assert_identical, harvest, manifest, normal_series, select_all
from harvester.api import verify_tree
from harvester.server.archive import Archive
from harvester.server.faults import FAULT_KINDS
from harvester.server.synthetic import SyntheticSpec, build_synthetic
from harvester.server.testing import serve_in_thread

from .seeds import CI_SOAK_SEEDS, SOAK_SEEDS_ENV, seeds_from_env

#: 3 collections x 10 patients x 2 studies x 5 series = 300 series of 3 small instances.
SOAK_SPEC = "collections=3,patients=10,studies=2,series=5,instances=3,size=2KiB,seed=61"
#: Every fault kind at >= 10% per request, plus latency and both bandwidth caps. Stalls outlast
#: the client's read timeout below (3 s against 0.5 s), so each one is a real timeout and retry;
#: each costs the harvest its read timeout, and 429s and timeouts bring the worker limit down to
#: about one, so the stalls are waited for one after another: the timeout is most of the soak's time.
SOAK_FAULTS = ("error=0.1,throttle=0.1,retry_after=0,reset=0.1,truncate=0.1,corrupt=0.1,stall=0.1,"
               "stall_for=3s,latency=2ms,rate=256KiB,total_rate=8MiB,seed={seed}")
SOAK_CLIENT = dict(workers=16, connections=32, read_timeout=0.5, retries=10, series_retries=10)


@pytest.fixture(scope="module")
def soak_archive(synthetic_cache: Path) -> Archive:
    return build_synthetic(SyntheticSpec.parse(SOAK_SPEC), synthetic_cache)


def run_soak(archive: Archive, seed: int, out: Path) -> dict:
    """Harvest every series of ``archive`` under the seed's storm; returns the figures."""
    faults = SOAK_FAULTS.format(seed=seed)
    with serve_in_thread(archive, faults=faults) as srv:
        result = harvest(srv.base_url, out, select_all(archive), **SOAK_CLIENT)
        stats = srv.stats.snapshot()
    uids = normal_series(archive)
    return {"seed": seed, "faults_spec": faults, "result": result, "stats": stats, "uids": uids}


@pytest.mark.slow
@pytest.mark.parametrize("seed", seeds_from_env(SOAK_SEEDS_ENV, CI_SOAK_SEEDS))
def test_chaos_soak_ends_complete_and_identical(soak_archive, tmp_path, seed, figures):
    out = tmp_path / "out"
    run = run_soak(soak_archive, seed, out)
    result, stats, uids = run["result"], run["stats"], run["uids"]
    assert len(uids) >= 300
    injected = stats["faults"]
    missing = [kind for kind in FAULT_KINDS if injected.get(kind, 0) == 0]
    assert not missing, f"faults never injected (the soak would prove nothing about them): {missing}"
    requests = sum(stats["requests"].values())
    for kind in ("error", "throttle", "reset"):
        # per-request faults: at least a few percent of all requests, or the rates are not what we say
        assert injected[kind] >= 0.03 * requests, (kind, injected[kind], requests)
    assert result.ok, result.failed[:5]
    assert result.fatal is None
    assert_identical(out, soak_archive, uids)
    checked = verify_tree(out)
    assert checked.ok and checked.files == 3 * len(uids)
    doc = manifest(out)
    assert doc["totals"]["complete"] == len(uids)
    figures.record("soak", seed=seed, series=len(uids), files=checked.files, bytes_verified=checked.bytes,
                   faults=injected, requests=requests, downloads=sum(stats["downloads"].values()),
                   bytes_sent=stats["bytes_sent"], retries=result.retries, lost=0)
