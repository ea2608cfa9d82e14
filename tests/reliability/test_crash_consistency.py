"""kill -9 at >= 20 moments spread over every phase of a harvest; the tree is consistent after
each kill, and no completed series is ever downloaded again (see ``crash.py``)."""
from __future__ import annotations

from pathlib import Path

import pytest

from harvest_helpers import assert_identical, normal_series
from harvester.api import verify_tree
from harvester.server.archive import Archive
from harvester.server.synthetic import SyntheticSpec, build_synthetic
from harvester.server.testing import serve_in_thread

from .crash import KILL_SPEC, PHASES, Campaign
from .seeds import CI_KILL_SEEDS, KILL_SEEDS_ENV, seeds_from_env


@pytest.fixture(scope="module")
def kill_archive(synthetic_cache: Path) -> Archive:
    return build_synthetic(SyntheticSpec.parse(KILL_SPEC), synthetic_cache)


@pytest.mark.slow
@pytest.mark.parametrize("seed", seeds_from_env(KILL_SEEDS_ENV, CI_KILL_SEEDS))
def test_kill_9_in_every_phase_then_resume(kill_archive, tmp_path, seed, figures):
    with serve_in_thread(kill_archive) as server:
        campaign = Campaign(kill_archive, server, tmp_path, seed)
        result = campaign.run()
        downloads = server.stats.downloads
    by_phase = result.by_phase()
    assert len(result.kills) >= 20, (len(result.kills), result.missed)
    never = [p for p in PHASES if by_phase[p] == 0]
    assert not never, f"no kill landed in {never}: {by_phase}"
    assert result.lost == 0
    uids = normal_series(kill_archive)
    for out in (*campaign.whole, campaign.out):   # a new folder once a harvest was whole
        assert_identical(out, kill_archive, uids)
        checked = verify_tree(out)
        assert checked.ok and checked.series == len(uids)
    # every series was downloaded at least once, and the campaign really interrupted some downloads
    assert set(downloads) == set(uids)
    figures.record("kill", seed=seed, kills=len(result.kills), by_phase=by_phase,
                   kills_detail=[k.__dict__ for k in result.kills], missed=result.missed,
                   finished_early=result.finished_early, complete_at_kills=result.complete_at_kills,
                   series=len(uids), bytes_verified=checked.bytes, files=checked.files,
                   downloads=sum(downloads.values()), lost=result.lost)
