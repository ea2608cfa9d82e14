"""Units of progress.py that have no I/O: the human-readable figures of the summary and the bar."""
from __future__ import annotations

import pytest

from harvester.progress import human_duration


@pytest.mark.parametrize("seconds,text", [
    (None, "?"), (0, "0.0s"), (0.94, "0.9s"), (9.94, "9.9s"), (9.97, "9s"), (10, "10s"), (59.9, "59s"),
    (187, "3m07s"), (7500, "2h05m"), (-0.2, "0.0s"),
])
def test_human_duration(seconds, text):
    assert human_duration(seconds) == text
