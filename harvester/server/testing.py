"""Run the NBIA-compatible server in a background thread, for tests and notebooks.

``serve_in_thread`` gives the server its own event loop in a daemon thread, so synchronous
peers (tcia_utils, nbiatoolkit, urllib) and async tests on another loop can both talk to it.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

from aiohttp import web

from harvester.server.app import STATS_KEY, DownloadWire
from harvester.server.archive import Archive
from harvester.server.auth import ServerAuth
from harvester.server.faults import FaultInjector, FaultSpec
from harvester.server.serve import start_server
from harvester.server.stats import Stats

_START_TIMEOUT = 30.0


@dataclass
class ServerHandle:
    """A running server: ``base_url`` ends in ``/nbia-api/services/v4``; ``root_url`` is
    ``http://HOST:PORT``; ``stats`` is the live :class:`Stats`; ``app`` the aiohttp app."""

    base_url: str
    root_url: str
    app: web.Application
    stats: Stats
    _loop: asyncio.AbstractEventLoop
    _faults: FaultInjector

    def set_faults(self, spec: FaultSpec | str | None) -> None:
        """Replace the injected faults (a spec, its text form, or None for none).

        Runs on the server's loop and returns once installed. Raises ``ValueError`` for a bad
        spec text.
        """
        parsed = FaultSpec.parse(spec) if isinstance(spec, str) else spec
        done: Future[None] = Future()

        def install() -> None:
            self._faults.replace(parsed)
            done.set_result(None)

        self._loop.call_soon_threadsafe(install)
        done.result(timeout=_START_TIMEOUT)

    def url(self, endpoint: str, version: str = "v4") -> str:
        """The URL of ``endpoint`` under API ``version``."""
        return f"{self.root_url}/nbia-api/services/{version}/{endpoint}"


@contextmanager
def serve_in_thread(archive: Archive, faults: FaultSpec | str | None = None, auth: ServerAuth | None = None,
                    host: str = "127.0.0.1", *, numbers_as_strings: bool = False,
                    wire: DownloadWire | None = None) -> Iterator[ServerHandle]:
    """Serve ``archive`` on a free port of ``host`` until the block exits (``numbers_as_strings``:
    see :func:`harvester.server.app.make_app`; ``wire`` chooses the ZIP format and IncludeMD5
    support, by default the real service's DEFLATED format).

    Raises whatever starting the server raises (``OSError`` if the address is unusable).
    """
    spec = FaultSpec.parse(faults) if isinstance(faults, str) else faults
    injector = FaultInjector(spec)
    loop = asyncio.new_event_loop()
    started: Future[tuple[web.AppRunner, str]] = Future()
    stopped = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            runner_url = loop.run_until_complete(start_server(archive, host, 0, injector, auth,
                                                              numbers_as_strings=numbers_as_strings, wire=wire))
        except BaseException as err:  # hand the failure to the caller's thread
            started.set_exception(err)
            loop.close()
            stopped.set()
            return
        started.set_result(runner_url)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner_url[0].cleanup())
            loop.close()
            stopped.set()

    thread = threading.Thread(target=run, name="harvester-test-server", daemon=True)
    thread.start()
    runner, base_url = started.result(timeout=_START_TIMEOUT)
    root_url = base_url.split("/nbia-api/")[0]
    app = runner.app
    assert isinstance(app, web.Application)
    try:
        yield ServerHandle(base_url, root_url, app, app[STATS_KEY], loop, injector)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        stopped.wait(_START_TIMEOUT)
        thread.join(_START_TIMEOUT)

