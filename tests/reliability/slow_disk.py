"""The harvester CLI on a slow disk: ``python slow_disk.py SECONDS <harvester arguments>``.

Every ``os.fsync`` and ``os.rename`` takes SECONDS longer, as on a busy spinning disk or a
network filesystem. Nothing else changes: the same ``harvester.cli.main`` runs with the same
arguments. The kill -9 campaign uses it to widen the windows between "row committed" and
"folder renamed" (commit: SQLite's own fsyncs are in C, out of reach; the rename into place is
slowed before it happens) and between "temp file written" and "renamed over harvest.json"
(manifest writing),
so that kills land there on purpose rather than by luck. It is test code: the harvester itself
has no hook and reads no environment variable for this.
"""
from __future__ import annotations

import os
import sys
import time


def main(argv: list[str]) -> int:
    delay = float(argv[0])
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(delay)
        real_fsync(fd)

    real_rename = os.rename

    def slow_rename(*args: object, **kwargs: object) -> None:
        time.sleep(delay)
        real_rename(*args, **kwargs)  # type: ignore[arg-type]

    os.fsync = slow_fsync
    os.rename = slow_rename
    from harvester.cli import main as harvester_main

    return harvester_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
