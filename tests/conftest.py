"""Shared fixtures: an anyio backend, a synthetic archive built once per session, and a
loopback NBIA server over it for each test."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harvester.server.archive import Archive
from harvester.server.synthetic import SyntheticSpec, build_synthetic
from harvester.server.testing import ServerHandle, serve_in_thread

#: Small but complete: two SYN collections (CT+MR), pydicom's samples, the HOSTILE collection.
SMALL_SPEC = "collections=2,patients=2,studies=1,series=2,instances=4,size=8KiB,modalities=CT+MR,samples=1,hostile=1,seed=1"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Byte-compile the package once, as ``pip install`` does for users (bench/harness.py's
    ``compile_trees`` does the same): with PYTHONDONTWRITEBYTECODE set, as on CI, every
    ``python -m harvester`` the tests start would otherwise compile it again (about 0.2 s of
    each process's start; the suite starts hundreds). Files already compiled are skipped."""
    import compileall

    compileall.compile_dir(str(Path(__file__).resolve().parent.parent / "harvester"), quiet=1)


#: Where glibc keeps the named semaphores of multiprocessing (``sem.mp-*``).
SHM = Path("/dev/shm")


def _semaphores() -> set[str]:
    try:
        return {p.name for p in SHM.glob("sem.mp-*")}
    except OSError:
        return set()


def _mapped_semaphores() -> set[str]:
    """The ``sem.mp-*`` files some live process has open (``sem_open`` maps the file)."""
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:   # the process ended, or is not ours to read
            continue
        for line in text.splitlines():
            at = line.find("/dev/shm/sem.mp-")
            if at >= 0:
                mapped.add(line[at + len("/dev/shm/"):].split()[0])
    return mapped


@pytest.fixture(autouse=True)
def no_leaked_semaphores() -> Iterator[None]:
    """Remove the named semaphores a test leaves behind: a test that SIGKILLs a Dask client with
    its cluster kills multiprocessing's resource tracker too, which would have unlinked them, and
    each full run of the suite left about 120 files in /dev/shm. Only files that appeared during
    the test and that no live process has open are removed."""
    before = _semaphores()
    yield
    new = _semaphores() - before
    if new:
        for name in new - _mapped_semaphores():
            try:
                (SHM / name).unlink()
            except OSError:
                pass


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where synthetic archives are generated: ``$HARVESTER_TEST_CACHE`` if set and writable
    (e.g. /work/main/.cache/synthetic, reused across runs), else a session temp dir."""
    configured = os.environ.get("HARVESTER_TEST_CACHE")
    if configured:
        path = Path(configured).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass
        else:
            if os.access(path, os.W_OK):
                return path
    return tmp_path_factory.mktemp("synthetic-cache")


@pytest.fixture(scope="session")
def small_spec() -> SyntheticSpec:
    return SyntheticSpec.parse(SMALL_SPEC)


@pytest.fixture(scope="session")
def small_archive(small_spec: SyntheticSpec, synthetic_cache: Path) -> Archive:
    return build_synthetic(small_spec, synthetic_cache)


@pytest.fixture
def server(small_archive: Archive) -> Iterator[ServerHandle]:
    """A fresh server (fresh stats, no faults) over ``small_archive`` on 127.0.0.1."""
    with serve_in_thread(small_archive) as handle:
        yield handle
