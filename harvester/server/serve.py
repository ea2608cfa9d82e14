"""``harvester serve``: publish a harvested directory or a synthetic archive over NBIA's API.

    harvester serve [DIR] [--synthetic SPEC] [--cache-dir DIR] [--host 127.0.0.1] [--port 0]
                    [--faults SPEC] [--auth USER:PASSWORD_FILE] [--token-expires SECONDS]
                    [--numbers-as-strings] [--zip deflated|stored] [--refuse-include-md5]
                    [--deflate-cache DIR|none] [--deflate-cache-memory SIZE]

The first line of stdout is the base URL (ending in ``/v4``), flushed, so a parent process
can read it and start talking; the server then runs until SIGINT or SIGTERM (exit 0).
Bad usage prints one ``harvester: error: ...`` line on stderr and exits 2.

DEFLATED entries come from a :class:`~harvester.server.deflatecache.DeflateCache` (the same
bytes, computed once per file): in memory (``--deflate-cache-memory``, default 16 MiB) and, for a
synthetic archive, on disk under ``<cache-dir>/deflate`` (``--deflate-cache DIR`` elsewhere,
``none`` for memory only). A harvested DIR gets no disk cache unless asked: nothing is written
beside it.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from aiohttp import web

from harvester.errors import UsageError
from harvester.server.app import DownloadWire, make_app
from harvester.server.archive import Archive, load_harvest_dir
from harvester.server.auth import ServerAuth
from harvester.server.deflatecache import DEFAULT_MEMORY_BYTES, DeflateCache
from harvester.server.faults import FaultInjector, FaultSpec
from harvester.server.zipstream import DEFAULT_ZIP_FORMAT, ZIP_FORMATS
from harvester.units import SIZE_HELP, parse_size

DEFAULT_CACHE_DIR = Path("~/.cache/harvester")
SHUTDOWN_TIMEOUT = 2.0
#: Seconds a connection may stay open without a complete request (stalled or dribbling clients,
#: idle keep-alives) before it is closed. aiohttp's own default is an hour, and older releases
#: never closed a connection that had not sent its first request (aiohttp PR #13681).
IDLE_TIMEOUT = 30.0
#: Request line and each header field at most this many bytes (HTTP 400 beyond): aiohttp's
#: defaults, stated here so a change of them upstream cannot loosen the server.
MAX_LINE_SIZE = MAX_FIELD_SIZE = 8190


def _port(text: str) -> int:
    """argparse type of ``--port``: 0 (any free port) to 65535; anything else is exit 2."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: give 0 (any free port) to 65535")
    return port


async def start_server(archive: Archive, host: str = "127.0.0.1", port: int = 0,
                       faults: FaultSpec | FaultInjector | None = None,
                       auth: ServerAuth | None = None, *, idle_timeout: float = IDLE_TIMEOUT,
                       numbers_as_strings: bool = False,
                       wire: DownloadWire | None = None) -> tuple[web.AppRunner, str]:
    """Start serving ``archive`` on the running loop; returns the runner and the v4 base URL.

    ``numbers_as_strings``: see :func:`harvester.server.app.make_app`.

    Stop it with ``await runner.cleanup()``. The app (and its stats) is ``runner.app``.
    Raises ``OSError`` when the address cannot be bound.
    """
    runner = web.AppRunner(make_app(archive, faults, auth, numbers_as_strings=numbers_as_strings, wire=wire),
                           access_log=None,
                           shutdown_timeout=SHUTDOWN_TIMEOUT, keepalive_timeout=idle_timeout,
                           max_line_size=MAX_LINE_SIZE, max_field_size=MAX_FIELD_SIZE)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    return runner, f"http://{shown}:{bound_port}/nbia-api/services/v4"


#: ``--synthetic`` keys (``SyntheticSpec``'s fields), their defaults, and what each sets; kept here
#: as text so that ``--help`` needs no pydicom (a test checks it against the dataclass).
SYNTHETIC_KEYS = (
    ("collections", "1", "collections: SYN-LUNG-CT, SYN-BRAIN-CT, ..."),
    ("patients", "2", "patients per collection"),
    ("studies", "1", "studies per patient"),
    ("series", "2", "series per study"),
    ("instances", "4", "DICOM files per series"),
    ("size", "16KiB", "pixel data bytes per file (64KB, 1MiB, ...)"),
    ("modalities", "CT", "modalities, one per collection in turn, joined by + (CT+MR)"),
    ("seed", "0", "random seed: the same spec gives the same bytes"),
    ("samples", "0", "1: add pydicom's real sample files"),
    ("hostile", "0", "1: add the HOSTILE collection (hostile ZIPs, names and text)"),
    ("released", "2019-01-01..2024-12-31", "release dates, spread over FROM..TO"),
    ("seg", "0", "1: add a mostly-zero SEG-like series (about 890:1)"),
    ("missing_md5", "0", "1: leave some md5hashes.csv rows empty, as the real archive does"),
    ("annotations", "0", "1: LIDC-style annotation files in the first collection"),
)


def synthetic_keys_help() -> str:
    """The ``--synthetic`` keys for an epilog: one line each, ``key=default  what it sets``."""
    width = max(len(k) + len(d) for k, d, _ in SYNTHETIC_KEYS) + 1
    return "synthetic spec keys (key=default):\n" + "".join(
        f"  {f'{k}={d}':<{width}}  {what}\n" for k, d, what in SYNTHETIC_KEYS)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``serve`` options to ``parser`` (the CLI's sub-command or :func:`main`)."""
    parser.add_argument("dir", nargs="?", metavar="DIR", help="a harvested output directory (with harvest.json)")
    parser.add_argument("--synthetic", metavar="SPEC",
                        help="serve a generated archive, e.g. collections=2,patients=3,series=2,instances=5,size=16KB "
                             "(the keys and their defaults are listed below)")
    parser.add_argument("--cache-dir", metavar="DIR", type=Path, default=None,
                        help=f"where synthetic archives are generated (default {DEFAULT_CACHE_DIR})")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=0, help="port (default 0: any free port)")
    parser.add_argument("--faults", metavar="SPEC",
                        help="inject failures, e.g. error=0.1,throttle=0.05,reset=0.05,latency=50ms,seed=7")
    parser.add_argument("--auth", metavar="USER:PASSWORD_FILE", action="append", default=None,
                        help="require bearer tokens; USER logs in with the password in PASSWORD_FILE (repeatable)")
    parser.add_argument("--token-expires", metavar="SECONDS", type=int, default=7200,
                        help="access token lifetime with --auth (default 7200)")
    parser.add_argument("--numbers-as-strings", action="store_true",
                        help="send the JSON's numbers (FileSize, ImageCount, ...) as strings, as some "
                             "deployments and proxies do")
    parser.add_argument("--zip", metavar="|".join(ZIP_FORMATS), default=DEFAULT_ZIP_FORMAT, dest="zip_format",
                        help="ZIP entries DEFLATED with data descriptors as the real service writes them "
                             f"(default: {DEFAULT_ZIP_FORMAT}), or STORED")
    parser.add_argument("--refuse-include-md5", action="store_true",
                        help="answer getImage's IncludeMD5 with HTTP 400, as v4 builds of May-Nov 2025 do")
    parser.add_argument("--deflate-cache", metavar="DIR|none", default=None,
                        help="keep each file's DEFLATED stream here once computed (default: <cache-dir>/deflate "
                             "for --synthetic, none for a harvested DIR); the bytes sent are the same")
    parser.add_argument("--deflate-cache-memory", metavar="SIZE", default=None,
                        help=f"memory for cached DEFLATED streams (default 16MiB; 0: none; {SIZE_HELP})")


def _parse_auth(values: list[str] | None, expires_in: int) -> ServerAuth | None:
    """Raises ``UsageError`` for a malformed value or an unreadable password file."""
    if not values:
        return None
    users: dict[str, str] = {}
    for value in values:
        user, sep, password_file = value.partition(":")
        if not sep or not user or not password_file:
            raise UsageError(f"--auth wants USER:PASSWORD_FILE, not {value.split(':')[0]!r}...")
        try:
            lines = Path(password_file).expanduser().read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise UsageError(f"cannot read the password file for {user}: {err.strerror}") from None
        if not lines or not lines[0]:
            raise UsageError(f"the password file for {user} is empty")
        users[user] = lines[0]
    if expires_in <= 0:
        raise UsageError("--token-expires must be positive")
    return ServerAuth(users=users, expires_in=expires_in)


def build_archive(args: argparse.Namespace) -> Archive:
    """The archive named on the command line. Raises ``UsageError`` for bad usage."""
    if bool(args.dir) == bool(args.synthetic):
        raise UsageError("give either a harvested DIR or --synthetic SPEC (exactly one)")
    if args.dir:
        return load_harvest_dir(args.dir)
    from harvester.server.synthetic import (  # pydicom only when needed
        SyntheticSpec,
        build_synthetic,
    )

    try:
        spec = SyntheticSpec.parse(args.synthetic)
    except ValueError as err:
        raise UsageError(f"--synthetic: {err}") from None
    cache_dir = (args.cache_dir or DEFAULT_CACHE_DIR).expanduser()
    try:
        return build_synthetic(spec, cache_dir)
    except OSError as err:
        raise UsageError(f"cannot generate the synthetic archive in {cache_dir}: {err}") from None


def build_deflate_cache(args: argparse.Namespace) -> DeflateCache:
    """The deflate cache the command line asks for (see the module docstring). Raises
    ``UsageError`` for a bad size or an unusable directory."""
    memory = DEFAULT_MEMORY_BYTES
    if args.deflate_cache_memory is not None:
        try:
            memory = parse_size(args.deflate_cache_memory)
        except ValueError as err:
            raise UsageError(f"--deflate-cache-memory: {err}") from None
    directory: Path | None = None
    if args.deflate_cache is not None:
        directory = None if args.deflate_cache.strip().lower() == "none" else Path(args.deflate_cache)
    elif args.synthetic:
        directory = (args.cache_dir or DEFAULT_CACHE_DIR) / "deflate"
    if directory is not None:
        try:
            directory.expanduser().mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"--deflate-cache: cannot use {directory}: {err.strerror or err}") from None
        if not directory.expanduser().is_dir():
            raise UsageError(f"--deflate-cache: {directory} is not a directory")
    return DeflateCache(directory, memory)


async def _serve_until_signalled(archive: Archive, args: argparse.Namespace, faults: FaultSpec | None,
                                 auth: ServerAuth | None, deflate_cache: DeflateCache) -> None:
    wire = DownloadWire(zip_format=args.zip_format, include_md5=not args.refuse_include_md5,
                        deflate_cache=deflate_cache)
    runner, base_url = await start_server(archive, args.host, args.port, faults, auth,
                                          numbers_as_strings=args.numbers_as_strings, wire=wire)
    await run_until_signalled(runner, base_url, f"serving {len(archive)} series at {base_url} (Ctrl-C to stop)")


async def run_until_signalled(runner: web.AppRunner, base_url: str, banner: str) -> None:
    """Print ``base_url`` (stdout, for scripts) and ``banner`` (stderr), then serve until SIGINT or
    SIGTERM; the runner is cleaned up however this ends."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        print(base_url, flush=True)
        print(f"harvester: {banner}", file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def run_serve(args: argparse.Namespace) -> int:
    """Run ``harvester serve`` with parsed ``args``; returns the exit code (0, or 2 for bad usage)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="harvester: %(levelname)s: %(message)s")
        for level in (logging.WARNING, logging.ERROR, logging.CRITICAL):  # harvester: warning: ...
            logging.addLevelName(level, logging.getLevelName(level).lower())
    try:
        faults = FaultSpec.parse(args.faults) if args.faults else None
    except ValueError as err:
        return _usage_error(f"--faults: {err}")
    if args.zip_format not in ZIP_FORMATS:
        return _usage_error(f"--zip wants one of {', '.join(ZIP_FORMATS)}, not {args.zip_format!r}")
    try:
        auth = _parse_auth(args.auth, args.token_expires)
        deflate_cache = build_deflate_cache(args)
        archive = build_archive(args)
    except UsageError as err:
        return _usage_error(str(err))
    try:
        asyncio.run(_serve_until_signalled(archive, args, faults, auth, deflate_cache))
    except OSError as err:
        return _usage_error(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}")
    return 0


def _usage_error(message: str) -> int:
    print(f"harvester: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    """``python -m harvester.server.serve ...``"""
    parser = argparse.ArgumentParser(prog="harvester serve", description=__doc__.split("\n\n")[0],
                                     epilog=synthetic_keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
