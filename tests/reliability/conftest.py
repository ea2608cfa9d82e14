"""Fixtures of the reliability suite: seed sets from the environment and a figures recorder.

``HARVESTER_SOAK_SEEDS`` / ``HARVESTER_KILL_SEEDS``: ``N`` means seeds 1..N, ``3,7,9`` those
seeds; unset, CI runs a short set. ``HARVESTER_RELIABILITY_FIGURES=FILE``: every test appends
what it measured (faults injected, kills by phase, inputs tried...) to FILE as JSON lines, which
``python -m tests.reliability.report`` turns into docs/reliability.md.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

FIGURES_ENV = "HARVESTER_RELIABILITY_FIGURES"
_write_lock = threading.Lock()


class Figures:
    """Appends ``{"test": nodeid, "kind": kind, ...}`` lines to the figures file, if one is set."""

    def __init__(self, path: str | None, test: str) -> None:
        self.path = Path(path) if path else None
        self.test = test
        self.recorded: list[dict[str, Any]] = []

    def record(self, kind: str, **data: Any) -> None:
        line = {"test": self.test, "kind": kind, **data}
        self.recorded.append(line)
        if self.path is None:
            return
        with _write_lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, sort_keys=True) + "\n")


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    return Figures(os.environ.get(FIGURES_ENV), request.node.nodeid)
