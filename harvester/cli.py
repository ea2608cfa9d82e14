"""The command line: the only place that reads argv and the environment.

Exit codes (documented in --help and the README):
  0  everything asked for is complete (or the command succeeded)
  1  some series failed, or a cart or list named series the archive does not have (each listed
     with its reason; the rest is harvested) / verify: a planned series failed, unavailable or
     missing, or a file damaged or extra
  2  bad usage or input: nothing was started
  3  a fatal stop: disk full, output not writable, credentials rejected, archive unreachable,
     another harvester running in DIR
130  interrupted (Ctrl-C); verified series are kept, rerun the same command to resume
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio

from harvester import __version__
from harvester.config import DEFAULT_API_URL, ENV_API_URL, IDC_ENDPOINT_URL, PER_INSTANCE_MODES, AuthConfig, Config
from harvester.errors import FatalError, HarvesterError, RequestError, UsageError
from harvester.units import SIZE_HELP, parse_size

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_FATAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

EPILOG = """\
exit codes: 0 complete, 1 some series failed or unavailable (the rest is harvested;
--strict makes unavailable ones exit 2 instead), 2 bad usage or input, 3 fatal stop
(disk full, credentials, archive unreachable, DIR in use, a link inside DIR),
130 interrupted (rerun to resume).
--json (run, sync, verify, plan): one JSON object on stdout, its keys in the README
("JSON summaries"); progress and messages stay on stderr.
API URL: --api-url, else $HARVESTER_API_URL, else the manifest's 'api:', else
the public TCIA v4 API."""


RUN_JSON_HELP = """\
--json prints, once the harvest ends, one object with the keys: ok, exit_code, planned,
complete, complete_now, complete_before, failed, unavailable, not_fetched (left by a
fatal stop), fatal (its reason or null), files, bytes (what DIR holds), received_bytes,
seconds, rate (this run's), requests, retries, output, manifest, failures (each:
SeriesInstanceUID, collection, patient, description, reason_class, detail),
unavailable_series (SeriesInstanceUID, reason); sync adds sync (new, changed,
unchanged, removed, pruned). --dry-run --json: dry_run, planned, complete_before,
to_fetch, to_fetch_bytes, unavailable, unavailable_series, list (as plan --json).
"""

VERIFY_EPILOG = """\
exit codes: 0 only when every planned series is there and intact; 1 when any series
failed, is unavailable or missing, or any file is damaged or extra (the summary line
counts each: '58 series checked: 53 intact, 5 failed, 0 missing, 0 damaged files,
1 extra file'); 2 bad usage (no harvest.json); 3 fatal stop (during --repair).
--json keys: ok, exit_code, checked, intact, failed, unavailable, missing,
damaged_files, extra_files, files, bytes, problems, extra, failures (each:
SeriesInstanceUID, collection, patient, description, status, error), refused.

examples:
  harvester verify harvest-demo && python train.py harvest-demo   # train only on a complete cohort
  harvester verify harvest-demo --repair                          # refetch what is damaged, failed or missing
  harvester verify harvest-demo --json | jq .ok                   # the counts for a script"""


def _examples(*lines: str, epilog: str = EPILOG) -> str:
    """A command's epilog: its examples (each 'command  # what it does'), then ``epilog``."""
    return "examples:\n" + "".join(f"  {line}\n" for line in lines) + ("\n" + epilog if epilog else "")


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line plus a pointer to --help (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"harvester: error: {message} (see '{self.prog} --help')\n")


def _size(text: str) -> int:
    """A size or rate option, parsed by :func:`harvester.units.parse_size` (MB decimal, MiB binary)."""
    try:
        value = parse_size(text, rate=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 bytes: {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _checked_spec(kind: str) -> Any:
    """An argparse type for a ``key=value,...`` spec (``synthetic`` or ``faults``): checked
    before anything starts, and passed on as written."""
    def check(text: str) -> str:
        from harvester.server.faults import FaultSpec
        from harvester.server.synthetic import SyntheticSpec
        try:
            (SyntheticSpec if kind == "synthetic" else FaultSpec).parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    return check


def _seconds(text: str) -> float:
    try:
        value = float(text.rstrip("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _add_api_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("archive")
    g.add_argument("--api-url", "--url", metavar="URL", dest="api_url",
                   help=f"NBIA API base ending in the version (default {DEFAULT_API_URL}), "
                        "or the root of a DICOMweb service with --source dicomweb")
    g.add_argument("--source", choices=["nbia", "dicomweb", "idc", "auto"], default=None,
                   help="archive type (default nbia; or the manifest's 'source:'); idc: Imaging Data Commons' "
                        "public buckets; auto: NBIA's plan, each series from IDC when its index has it with "
                        "the same instance count")
    g.add_argument("--endpoint-url", metavar="URL",
                   help=f"--source idc: the S3 endpoint (default {IDC_ENDPOINT_URL}, region us-east-1; the GCS "
                        "mirror: https://storage.googleapis.com)")
    g.add_argument("--idc-index", metavar="FILE", type=Path,
                   help="--source idc: the index parquet (default: the idc-index-data package's, harvester[idc])")
    g.add_argument("--token-env", metavar="VAR", help="environment variable holding a bearer token (DICOMweb)")
    g.add_argument("--user", metavar="NAME",
                   help="user name: NBIA bearer-token login (private or v2-era installs), or HTTP basic for DICOMweb")
    g.add_argument("--collection-attribute", metavar="KEYWORD",
                   help="DICOMweb: the DICOM attribute that holds the collection (default ClinicalTrialProtocolID)")
    g.add_argument("--password-env", metavar="VAR", help="environment variable holding the password")
    g.add_argument("--password-file", metavar="FILE", type=Path, help="file holding the password")
    g.add_argument("--token-url", metavar="URL", help="OAuth token URL (default: <host>/nbia-api/oauth/token)")
    g.add_argument("--timeout", type=_seconds, metavar="S",
                   help=f"seconds without a byte before a request counts as stalled (default {Config.read_timeout:g})")
    g.add_argument("--retries", type=_positive, metavar="N", help=f"attempts per HTTP request (default {Config.retries})")
    g.add_argument("--deadline", type=_seconds, metavar="S", dest="request_deadline",
                   help=f"seconds one request may take in all (default {Config.request_deadline:g})")
    g.add_argument("--min-rate", type=_size, metavar="RATE",
                   help="a body slower than this over --stall-window is cut off as stalled (default "
                        f"{Config.stall_min_bytes // Config.stall_window:g} B/s)")
    g.add_argument("--stall-window", type=_seconds, metavar="S",
                   help=f"seconds over which --min-rate is measured (default {Config.stall_window:g})")
    g.add_argument("--max-retry-after", type=_seconds, metavar="S",
                   help=f"longest Retry-After waited for (default {Config.max_retry_after:g}); a longer one "
                        "fails the request, and the series is tried again later")
    g.add_argument("--max-json-bytes", type=_size, metavar="SIZE",
                   help=f"largest JSON answer read (default {Config.max_json_bytes >> 20} MiB)")
    g.add_argument("--allow-cross-origin-redirects", action="store_true", default=None,
                   dest="cross_origin_redirects",
                   help="follow https redirects to another host (never to http; credentials are not sent there)")


def _add_strict_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict", action="store_true",
                   help="refuse (exit 2, nothing downloaded) when a cart or UID list names series the archive "
                        "does not have or refuses; by default they are listed as unavailable, the rest is "
                        "harvested and the exit code is 1")


def _add_log_args(p: argparse.ArgumentParser) -> None:
    """-v and --log-file, on every command (``harvester run ... -v`` reads as users expect)."""
    g = p.add_argument_group("logging")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="say more on stderr: each series done, failed or retried (-vv: every start too)")
    g.add_argument("--log-file", metavar="PATH", type=Path,
                   help="append a timestamped log to PATH (what -v says, and -vv's detail with -vv); "
                        "passwords and tokens are redacted")


def _add_json_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true",
                   help=f"print {what} as one JSON object on stdout (keys in the README, 'JSON summaries')")


def _add_harvest_args(p: argparse.ArgumentParser) -> None:
    """The options of the commands that download (run, sync)."""
    p.add_argument("-o", "--out", metavar="DIR", type=_out_dir, required=True, help="output directory")
    p.add_argument("--workers", type=_positive, metavar="N",
                   help=f"series downloaded at once (default {Config.workers}); as many again may be verifying "
                        "and unpacking meanwhile, so the progress line's 'in flight' can reach 2 x N; backs "
                        "off by itself on 429/503/timeouts; use fewer, or --max-rate, on a shared link")
    p.add_argument("--connections", type=_positive, metavar="N", help="HTTP connections at most (default 2 x workers)")
    p.add_argument("--max-connections", type=_positive, metavar="N",
                   help=f"connections moving bytes at once, at most (default {Config.max_connections}, and no more "
                        "than --connections): starting at --workers, more are opened while the total throughput "
                        "grows, none while it holds, half are closed on 429/503/timeouts; spare ones fetch the "
                        "last series instance by instance")
    p.add_argument("--layout", metavar="LAYOUT",
                   help="descriptive (default; the Java NBIA Data Retriever's), classic, tcia2026 (TCIA's 2026 "
                        "Data Retriever's; metadata/metadata.csv), flat, or a template like "
                        "'{Collection}/{PatientID}/{StudyDate}-{StudyDescription}/{Modality}-{SeriesNumber}-{SeriesInstanceUID}'")
    p.add_argument("--series-retries", type=_count, metavar="N", help=f"extra attempts per series (default {Config.series_retries})")
    p.add_argument("--max-rate", type=_size, metavar="RATE",
                   help=f"cap total bandwidth in bytes/s, e.g. 50MB or 20MiB/s: {SIZE_HELP}")
    p.add_argument("--per-instance", choices=PER_INSTANCE_MODES, metavar="WHEN",
                   help="NBIA: fetch a series instance by instance (getSingleImage), several at once, keeping "
                        "each verified instance for a resume: auto (default: series of 256 MiB or more that one connection is slow for), "
                        "always, never (one getImage ZIP per series)")
    p.add_argument("--no-progress", action="store_true",
                   help="plain periodic status lines instead of a live line (the default on a dumb terminal "
                        "or when stderr is not a terminal)")
    p.add_argument("--stats-interval", type=_seconds, metavar="S", default=10.0,
                   help="seconds between plain status lines (default 10)")
    p.add_argument("--force", action="store_true",
                   help="add to DIR even though it holds a harvest of another archive (kind and URL) or "
                        "layout, which is refused by default (exit 2): the records already there are kept as "
                        "they are (complete series are not fetched again and stay in their folders), new "
                        "series go where this run's layout puts them, and harvest.json then names this run's "
                        "archive and layout")
    p.add_argument("--no-space-check", action="store_false", dest="space_check",
                   help="start even when DIR's free space is less than the series still to fetch need (plus "
                        "5%% and 64 MiB), which is refused by default (exit 3, nothing fetched)")
    p.add_argument("--cluster", metavar="ADDRESS",
                   help="run on Dask distributed: local:N (N worker processes on this machine) or a scheduler, "
                        "tcp://host:8786, whose workers all mount DIR; --workers is then per worker, "
                        "--connections and --max-rate the cluster's total (pip install 'harvester[dask]')")
    p.add_argument("--quiet", "-q", action="store_true", help="only errors and the final summary")
    _add_json_arg(p, "the final summary")
    _add_log_args(p)


def build_parser(*, serve: bool = True) -> argparse.ArgumentParser:
    """The CLI's parser; ``serve=False`` leaves out the options of ``serve`` (they import the
    whole NBIA server, 40 ms of every other command's start-up) and keeps only its name."""
    parser = _Parser(
        prog="harvester",
        description="Harvest DICOM series from TCIA's NBIA API (or any NBIA-compatible archive): plan a query, "
                    "download concurrently with retries, verify every file, resume after any interruption.",
        epilog=_examples("harvester demo                                  # try it: a local archive, harvested for real",
                         "harvester run my-cart.tcia -o cart              # harvest a TCIA portal cart; rerun to resume",
                         "harvester verify cart && python train.py cart   # train only on a complete, intact cohort",
                         "harvester COMMAND --help                        # each command's options and examples"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"harvester {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="plan and harvest a query into a directory (resumable)",
                         description="Plan QUERY and harvest every series into DIR: streamed to disk, verified "
                                     "(count, size, MD5, DICOM), unpacked safely, recorded in DIR/harvest.json. "
                                     "Rerun the same command to resume.",
                         epilog=_examples("harvester run config/lidc-ct.yaml -o ~/tcia/lidc   # a query manifest",
                                          "harvester run my-cart.tcia -o cart --dry-run      # what would be fetched",
                                          "harvester run q.yaml -o out --json > summary.json   # the summary for a script",
                                          "harvester run my-cart.tcia -o cart --workers 8 --max-rate 20MB",
                                          "harvester run series.csv -o list --layout classic   # a SeriesInstanceUID column",
                                          "harvester run q.yaml -o out --api-url http://127.0.0.1:8080/nbia-api/services/v4",
                                          epilog=RUN_JSON_HELP + EPILOG),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("query", metavar="QUERY", help="query manifest (.yaml/.json), TCIA cart (.tcia) or UID list (.csv/.txt)")
    run.add_argument("--dry-run", action="store_true",
                     help="plan, and list what would be fetched (series already complete in DIR left out); "
                          "writes nothing")
    _add_harvest_args(run)
    _add_strict_arg(run)
    _add_api_args(run)

    plan = sub.add_parser("plan", help="show what a query selects (series, images, bytes) without downloading",
                          epilog=_examples("harvester plan my-cart.tcia                # series, images and bytes per collection",
                                           "harvester plan q.yaml --list               # one line per series",
                                           "harvester plan q.yaml --json               # totals and every series, for a script"),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("query", metavar="QUERY", help="query manifest (.yaml/.json), TCIA cart (.tcia) or UID list (.csv/.txt)")
    plan.add_argument("--json", action="store_true",
                      help="print the totals and every series (key 'list') as one JSON object")
    plan.add_argument("--list", action="store_true",
                      help="one line per series: collection, patient, modality, series UID, description, size")
    _add_log_args(plan)
    _add_strict_arg(plan)
    _add_api_args(plan)

    query = sub.add_parser("query", help="ad-hoc metadata query, e.g. harvester query getSeries Collection=X",
                           epilog=_examples("harvester query getCollectionValues",
                                            "harvester query getSeries Collection=LIDC-IDRI Modality=CT --format csv > series.csv",
                                            "harvester query getPatient Collection=LIDC-IDRI --format table",
                                            "harvester query getSeries Collection=LIDC-IDRI --format table "
                                            "--columns PatientID,Modality,SeriesDescription,ImageCount"),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    query.add_argument("endpoint", metavar="ENDPOINT", help="getCollectionValues, getSeries, getPatient, ...")
    query.add_argument("params", nargs="*", metavar="Key=Value", help="parameters (names are case-sensitive)")
    query.add_argument("--format", choices=["json", "csv", "table"], default=None,
                       help="output format (default: table on a terminal, json otherwise)")
    query.add_argument("--columns", metavar="A,B,C",
                       help="only these columns, in this order (a table of 26 columns does not fit 80)")
    _add_log_args(query)
    _add_api_args(query)

    sync = sub.add_parser("sync", help="bring DIR up to date with a query: new, changed and missing series",
                          description="Mirror QUERY into DIR: fetch series that are new, changed on the server "
                                      "(image count, size, or re-released since the last sync), missing or failed. "
                                      "A changed series keeps its old copy until the new one verifies.",
                          epilog=_examples("harvester sync q.yaml -o mirror --dry-run   # what would change",
                                           "harvester sync q.yaml -o mirror --json      # the summary as JSON",
                                           "harvester sync q.yaml -o mirror --prune --max-rate 20MB   # nightly",
                                           epilog=RUN_JSON_HELP + EPILOG),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    sync.add_argument("query", metavar="QUERY", help="the mirror's query manifest, cart or UID list")
    sync.add_argument("--prune", action="store_true",
                      help="move series no longer selected to DIR/.harvester/trash/ (never deleted)")
    sync.add_argument("--dry-run", action="store_true", help="print the difference and change nothing")
    _add_harvest_args(sync)
    _add_strict_arg(sync)
    _add_api_args(sync)

    verify = sub.add_parser("verify", help="re-hash every harvested file against the harvest's records",
                            description="Re-hash every file the harvest records (DIR/.harvester/state.db, or\n"
                                        "DIR/harvest.json for a harvest made before it), report files that no record\n"
                                        "lists (extra), and count the series that failed, are unavailable or missing.",
                            epilog=VERIFY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("dir", metavar="DIR", type=_out_dir, help="the output directory of a harvest")
    verify.add_argument("--repair", action="store_true",
                        help="refetch what fails, from the archive DIR/harvest.json records: damaged files with "
                             "getSingleImage (the whole series only if needed), failed and missing series whole")
    verify.add_argument("--no-progress", action="store_true",
                        help="plain periodic status lines instead of a live line")
    verify.add_argument("--stats-interval", type=_seconds, metavar="S", default=10.0,
                        help="seconds between plain status lines (default 10)")
    _add_json_arg(verify, "the counts and what is wrong")
    _add_log_args(verify)
    _add_api_args(verify)

    status = sub.add_parser("status", help="what DIR holds per collection, last sync, failures, disk use",
                            epilog=_examples("harvester status mirror", "harvester status mirror --json   # for a script",
                                             epilog=""),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    status.add_argument("dir", metavar="DIR", type=_out_dir, help="the output directory of a harvest")
    status.add_argument("--json", action="store_true", help="print it as JSON")
    _add_log_args(status)

    report = sub.add_parser("report", help="write a self-contained HTML report of what DIR holds",
                            epilog=_examples("harvester report mirror                # writes mirror/report.html",
                                             "harvester report mirror -o - > /srv/www/mirror.html", epilog=""),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("dir", metavar="DIR", type=_out_dir, help="the output directory of a harvest")
    report.add_argument("-o", "--out", metavar="FILE", type=Path, default=None,
                        help="where to write it ('-' for stdout; default DIR/report.html)")
    _add_log_args(report)

    export = sub.add_parser("export", help="write a TCIA cart (.tcia) or a CSV of the series in DIR",
                            epilog=_examples("harvester export mirror --tcia cohort.tcia   # for the TCIA portal or Data Retriever",
                                             "harvester export mirror --csv - | grep CT     # one row per series, to stdout",
                                             epilog=""),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("dir", metavar="DIR", type=_out_dir, help="the output directory of a harvest")
    export.add_argument("--tcia", metavar="FILE", type=Path,
                        help="a cart the TCIA portal and Data Retriever accept ('-' for stdout)")
    export.add_argument("--csv", metavar="FILE", type=Path, help="one row per series with metadata and path ('-' for stdout)")
    export.add_argument("--jsonl", metavar="FILE", type=Path,
                        help="every series record, one JSON object a line, streamed ('-' for stdout; any size)")
    export.add_argument("--manifest", action="store_true",
                        help="write DIR/harvest.json and metadata.csv again from the state database")
    _add_log_args(export)

    demo = sub.add_parser("demo", help="serve a small synthetic archive on loopback and harvest it for real",
                          epilog=_examples("harvester demo                      # into ./harvest-demo, with a few faults",
                                           "harvester demo /tmp/demo --faults ''   # no injected faults",
                                           "harvester demo --synthetic collections=1,patients=2,series=2,instances=4,size=64KiB"),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("dir", metavar="DIR", type=Path, nargs="?", default=Path("harvest-demo"),
                      help="where to harvest it (default harvest-demo)")
    demo.add_argument("--synthetic", metavar="SPEC", type=_checked_spec("synthetic"),
                      default="collections=2,patients=3,studies=2,series=2,instances=8,size=32KiB,samples=1,seed=1",
                      help="synthetic archive spec (see harvester serve --help)")
    demo.add_argument("--faults", metavar="SPEC", type=_checked_spec("faults"), default="error=0.05,truncate=0.05,reset=0.03,seed=3",
                      help="faults the demo server injects, to show retries (use '' for none)")
    demo.add_argument("--cache-dir", metavar="DIR", type=Path, default=None,
                      help="where the synthetic archive is built (default $HARVESTER_CACHE or ~/.cache/harvester)")
    demo.add_argument("--no-progress", action="store_true", help="plain periodic status lines instead of a live line")
    _add_log_args(demo)

    serve_help = "serve a harvested DIR or a synthetic archive with the NBIA API"
    if not serve:
        sub.add_parser("serve", help=serve_help)
        return parser
    from harvester.server.serve import add_serve_arguments, synthetic_keys_help
    serve_parser = sub.add_parser(
        "serve", help=serve_help,
        epilog=_examples("harvester serve harvest-demo --port 8080   # re-publish a harvest",
                         "harvester serve --synthetic collections=2,patients=3,series=2,instances=5,size=16KiB "
                         "--faults error=0.1,latency=50ms,seed=7",
                         epilog=f"{synthetic_keys_help()}\nsizes and rates: {SIZE_HELP}"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(serve_parser)
    return parser


# ---------------------------------------------------------------- config

def _password(args: argparse.Namespace, env: dict[str, str]) -> str | None:
    if args.password_file:
        try:
            if not args.password_file.is_file():
                raise UsageError(f"--password-file {args.password_file} is not a regular file")
            with open(args.password_file, encoding="utf-8") as fh:
                return fh.read(64 * 1024).strip()  # a password, not a stream: read a bounded amount
        except UnicodeDecodeError:
            raise UsageError(f"--password-file {args.password_file} is not UTF-8 text") from None
        except OSError as exc:
            raise UsageError(f"cannot read --password-file {args.password_file}: {exc.strerror}") from None
    if args.password_env:
        if args.password_env not in env:
            raise UsageError(f"--password-env names {args.password_env}, which is not set")
        return env[args.password_env]
    return None


def _token_url(api_url: str) -> str:
    m = re.match(r"^(https?://[^/]+)(/.*?)?/services/", api_url + "/")
    if m:
        return f"{m.group(1)}{m.group(2) or ''}/oauth/token"
    return api_url.rstrip("/").rsplit("/", 1)[0] + "/oauth/token"


def _out_dir(text: str) -> Path:
    """argparse type of ``-o``: an empty one (``-o "$OUT"`` with OUT unset) is refused, never the
    current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the output directory is empty (an unset shell variable?); name a folder")
    return Path(text)


def _shown_url(url: str) -> str:
    """A URL a user gave, for a usage error: any ``user:password@`` left out, with or without a scheme."""
    from harvester.redact import redact

    return redact(re.sub(r"^([a-z][a-z0-9+.-]*://)?[^/\s@]*@", lambda m: m.group(1) or "", url, flags=re.I))


def build_config(args: argparse.Namespace, env: dict[str, str], manifest_api: str | None = None,
                 manifest_layout: str | None = None, manifest_source: str | None = None) -> Config:
    source = getattr(args, "source", None) or manifest_source or "nbia"
    default = DEFAULT_API_URL if source in ("nbia", "auto") else None
    api = getattr(args, "api_url", None) or env.get(ENV_API_URL) or manifest_api or default
    idc: dict[str, Any] = {}
    if source in ("idc", "auto"):
        endpoint = getattr(args, "endpoint_url", None) or IDC_ENDPOINT_URL
        idc = {"endpoint_url": endpoint.rstrip("/"), "idc_index": getattr(args, "idc_index", None)}
        if source == "idc":  # the endpoint is the archive harvest.json names
            api = endpoint
    elif getattr(args, "endpoint_url", None) or getattr(args, "idc_index", None):
        raise UsageError("--endpoint-url and --idc-index are for --source idc or auto")
    if not api:
        raise UsageError("a DICOMweb source needs its URL", hint="give --url URL or 'url:' in the manifest")
    if not re.match(r"^https?://[^/\s]+", api):
        raise UsageError(f"API URL {_shown_url(api)!r} is not an http(s) URL")
    try:
        urlsplit(api).port
    except ValueError:
        raise UsageError(f"API URL {_shown_url(api)!r} has an invalid port",
                         hint="a port is a number from 1 to 65535") from None
    changes: dict[str, Any] = {"api_url": api.rstrip("/"), "source": source, **idc}
    if getattr(args, "token_env", None):
        if source != "dicomweb":
            raise UsageError("--token-env is for --source dicomweb (NBIA logs in with --user and a password)")
        if args.token_env not in env:
            raise UsageError(f"--token-env names {args.token_env}, which is not set")
        token = env[args.token_env].strip()
        if not token or not all("!" <= c <= "~" for c in token):
            raise UsageError(f"--token-env {args.token_env} holds no usable bearer token",
                             hint="a token is one word of visible ASCII characters")
        changes["bearer_token"] = token
    if getattr(args, "user", None):
        password = _password(args, env)
        if password is None:
            raise UsageError("--user needs --password-env VAR or --password-file FILE (never the password itself)")
        changes["auth"] = AuthConfig(token_url=args.token_url or _token_url(api), username=args.user,
                                     password=password)
    elif getattr(args, "password_env", None) or getattr(args, "password_file", None):
        raise UsageError("a password was given without --user")
    for name, attr in (("timeout", "read_timeout"), ("retries", "retries"), ("workers", "workers"),
                       ("collection_attribute", "collection_attribute"),
                       ("connections", "connections"), ("series_retries", "series_retries"),
                       ("max_rate", "max_rate"), ("request_deadline", "request_deadline"),
                       ("stall_window", "stall_window"), ("max_retry_after", "max_retry_after"),
                       ("max_json_bytes", "max_json_bytes"), ("cross_origin_redirects", "cross_origin_redirects"),
                       ("per_instance", "per_instance"), ("max_connections", "max_connections")):
        value = getattr(args, name, None)
        if value is not None:
            changes[attr] = value
    if getattr(args, "min_rate", None) is not None:
        changes["stall_min_bytes"] = int(args.min_rate * changes.get("stall_window", Config.stall_window))
    if getattr(args, "workers", None) and not getattr(args, "connections", None):
        changes["connections"] = max(2 * args.workers, 4)
    layout = getattr(args, "layout", None) or manifest_layout
    if layout:
        from harvester.store.layout import check_layout
        changes["layout"] = check_layout(layout)
    elif getattr(args, "out", None) is not None:
        changes["layout"] = None   # a run or sync: DIR's recorded layout, else descriptive
    if getattr(args, "out", None) is not None:
        changes["out_dir"] = args.out
    changes["strict"] = bool(getattr(args, "strict", False))
    changes["force"] = bool(getattr(args, "force", False))
    changes["space_check"] = bool(getattr(args, "space_check", True))
    changes["progress"] = not getattr(args, "no_progress", False)
    changes["quiet"] = bool(getattr(args, "quiet", False))
    return Config(**changes)


# ---------------------------------------------------------------- commands

def _print_plan_table(plan: Any) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from harvester.display import printable
    from harvester.events import human_bytes

    table = Table(title=f"{len(plan.tasks)} series selected")
    for col in ("collection", "series", "images", "size"):
        table.add_column(col, justify="left" if col == "collection" else "right")
    totals = _plan_totals(plan)
    for name, c in plan.collections.items():  # server text: Text, never markup
        table.add_row(Text(printable(name)), str(c.series), str(c.images), human_bytes(c.bytes))
    table.add_row("[bold]total", f"[bold]{totals['series']}", f"[bold]{totals['images']}",
                  f"[bold]{human_bytes(totals['bytes'])}")
    Console(highlight=False).print(table)
    unknown = sum(1 for t in plan.tasks if t.file_size is None)
    if unknown:
        print(f"{unknown} series of unknown size (the archive does not say; e.g. DICOMweb): sizes above are a minimum")
    print(f"{plan.requests} metadata requests, {plan.retries} retried")


def _print_warnings(plan: Any) -> None:
    for warning in plan.warnings:
        print(f"harvester: warning: {warning}", file=sys.stderr, flush=True)


def _print_warning_event(ev: Any) -> None:
    if ev.kind == "warning":
        print(f"harvester: warning: {ev.message}", file=sys.stderr, flush=True)


def _print_plan_notes(plan: Any, *, listed: bool) -> None:
    """On stderr: how many series are unavailable (each with the archive's reason when
    ``listed``). Warnings are said apart: ``_print_warnings`` for plan, events for run."""
    if plan.unavailable and listed:
        print(f"{len(plan.unavailable)} series unavailable (the archive does not give them; the rest is planned):",
              file=sys.stderr)
        for u in plan.unavailable:
            print(f"  unavailable: {u.series_uid}: {u.reason}", file=sys.stderr)
    elif plan.unavailable:
        print(f"{len(plan.unavailable)} series unavailable (the archive does not give them): harvesting the rest; "
              "the summary and harvest.json list them", file=sys.stderr)
    sys.stderr.flush()


def _plan_totals(plan: Any) -> dict[str, Any]:
    """The plan's totals as ``plan --json`` prints them (built here from the plan's collections,
    whatever shape ``Plan.to_dict`` has)."""
    cols = plan.collections
    out: dict[str, Any] = {
        "series": plan.series, "images": sum(c.images for c in cols.values()),
        "bytes": sum(c.bytes for c in cols.values()),
        "collections": {k: {"series": v.series, "images": v.images, "bytes": v.bytes} for k, v in cols.items()},
        "requests": plan.requests,
    }
    if plan.unavailable:
        out["unavailable"] = [u.to_json() for u in plan.unavailable]
    if plan.warnings:
        out["warnings"] = list(plan.warnings)
    return out


def json_with_list(head: dict[str, Any], key: str, items: Sequence[Any], encode: Callable[[Any], Any],
                   batch: int = 1000) -> Iterator[str]:
    """The text of ``json.dumps({**head, key: [encode(i) for i in items]})``, in pieces of
    ``batch`` items: the list of a plan of all of TCIA would be about 300 MB more at once, and
    one ``dumps`` per item cost a tenth of a 20,000-series plan."""
    start = json.dumps({**head, key: []})
    assert start.endswith("[]}")
    yield start[:-2]
    for n in range(0, len(items), batch):
        part = json.dumps([encode(item) for item in items[n:n + batch]])
        yield (", " if n else "") + part[1:-1]
    yield "]}"


def _series_json(task: Any) -> dict[str, Any]:
    return {"SeriesInstanceUID": task.series_uid, "Collection": task.collection, "PatientID": task.patient_id,
            "StudyInstanceUID": task.study_uid, "Modality": task.modality,
            "SeriesDescription": str(task.row.get("SeriesDescription") or ""),
            "ImageCount": task.image_count, "FileSize": task.file_size}


def _series_line(task: Any) -> str:
    """``collection  patient  modality  series UID  "description"  size``: one line per series."""
    from harvester.display import printable
    from harvester.events import human_bytes

    description = json.dumps(str(task.row.get("SeriesDescription") or ""), ensure_ascii=False)
    size = "?" if task.file_size is None else human_bytes(task.file_size)
    return printable(f"{task.collection}  {task.patient_id}  {task.modality}  {task.series_uid}  {description}  {size}")


def _planning(config: Config, env: dict[str, str]) -> Any:
    """A live "planning ..." line on a terminal while a plan is made (nothing elsewhere)."""
    import contextlib

    from harvester.display import LiveDisplay, use_live
    from harvester.events import Tally

    if config.quiet or not use_live(sys.stderr, env):
        return contextlib.nullcontext()
    return LiveDisplay(Tally(), transient=True)


def _plan_with_progress(query: Any, config: Config, env: dict[str, str]) -> Any:
    from harvester.api import aplan

    with _planning(config, env):
        return anyio.run(lambda: aplan(query, config, details=False))  # totals only


def cmd_plan(args: argparse.Namespace, env: dict[str, str]) -> int:
    from harvester.query import load_query

    query = load_query(args.query)
    config = build_config(args, env, query.url or query.api, query.layout, query.source)
    plan = _plan_with_progress(query, config, env)
    _print_warnings(plan)
    # source auto: how many series each archive gives (each task's row says which)
    split = {s: sum(1 for t in plan.tasks if t.row.get("source") == s) for s in ("idc", "nbia")} \
        if config.source == "auto" else None
    if args.json:
        head = {**_plan_totals(plan), **({"sources": split} if split else {})}
        for piece in json_with_list(head, "list", plan.tasks, _series_json):
            sys.stdout.write(piece)
        sys.stdout.write("\n")
        sys.stdout.flush()
    elif args.list:
        for task in plan.tasks:
            print(_series_line(task))
    else:
        _print_plan_table(plan)
        if split:
            print(f"{split['idc']} series from IDC, {split['nbia']} from NBIA")
    _print_plan_notes(plan, listed=True)
    return EXIT_FAILED if plan.unavailable else EXIT_OK


def cmd_query(args: argparse.Namespace, env: dict[str, str]) -> int:
    from harvester.source.nbia import NBIAClient, make_session

    params: dict[str, str] = {}
    for item in args.params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"parameter {item!r} is not Key=Value")
        params[key] = value
    wanted = [c.strip() for c in (args.columns or "").split(",") if c.strip()]
    if args.columns is not None and not wanted:
        raise UsageError(f"--columns {args.columns!r} names no column", hint="e.g. --columns PatientID,Modality")
    config = build_config(args, env)
    if config.source == "dicomweb":
        # the endpoints and rows of ``query`` are NBIA's; a DICOMweb server answers none of them,
        # and sending them to its URL would only turn up a 404 (or another archive's answer)
        raise UsageError("harvester query speaks NBIA's API (getSeries, getPatient, ...), which a DICOMweb "
                         "server does not answer", hint="list what a DICOMweb server holds with harvester plan "
                         "QUERY --source dicomweb --list, or query NBIA without --source dicomweb")

    async def go() -> list[dict[str, Any]]:
        async with make_session(config) as session:
            return await NBIAClient(config, session).query(args.endpoint, params)

    if config.source == "idc":  # the index answers getSeries; nothing else of NBIA's API has an equivalent
        from harvester.source.idc import index as idc_index

        if args.endpoint != "getSeries":
            raise UsageError(f"--source idc answers getSeries only (from the IDC index), not {args.endpoint!r}",
                             hint="e.g. harvester query getSeries Collection=LIDC-IDRI --source idc")
        path = Path(config.idc_index) if config.idc_index else idc_index.default_index()
        rows = idc_index.query_series(path, params)
    else:
        rows = anyio.run(go)
    fmt = args.format or ("table" if sys.stdout.isatty() else "json")
    keys: list[str] = list(dict.fromkeys(k for r in rows for k in r))
    if wanted:
        unknown = [c for c in wanted if c not in keys]
        if rows and unknown:
            raise UsageError(f"--columns: {unknown[0]!r} is not a column of this answer",
                             hint=f"its columns: {','.join(keys)}")
        keys = wanted
        rows = [{k: r[k] for k in keys if k in r} for r in rows]
    if fmt == "json":
        print(json.dumps(rows, indent=1))
    elif fmt == "csv":
        import csv
        writer = csv.DictWriter(sys.stdout, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        if sys.stdout.isatty():   # server text on a terminal: its control characters made visible
            from harvester.redact import printable
            rows = [{k: printable(v) if isinstance(v, str) else v for k, v in r.items()} for r in rows]
        writer.writerows(rows)
    else:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        from harvester.display import printable
        # Server text is Text, never markup: "[red]", "[/]", "[link=...]" or ":x:" is shown as sent.
        table = Table(title=Text(printable(f"{args.endpoint}: {len(rows)} rows")))
        for k in keys:
            table.add_column(Text(printable(str(k))), overflow="fold")
        for r in rows:
            table.add_row(*[Text("" if r.get(k) is None else printable(str(r.get(k)))) for k in keys])
        console = Console(highlight=False)
        console.print(table)
        if len(keys) > 6 and not wanted and console.width < 12 * len(keys):
            print(f"harvester: {len(keys)} columns do not fit {console.width}: pick some with --columns "
                  f"{','.join(keys[:4])}", file=sys.stderr)
    return EXIT_OK


def _recorded_source(out_dir: Path) -> tuple[str | None, str | None]:
    """(kind, URL) of the archive ``out_dir``'s harvest.json records; (None, None) when it
    cannot be read (verify then says why)."""
    from harvester.store.manifest import read_manifest, recorded_source
    try:
        return recorded_source(read_manifest(out_dir))
    except HarvesterError:
        return None, None


def _display(config: Config, env: dict[str, str], tally: Any, interval: float) -> Any:
    """The display for a harvest or a verify: a live line on a terminal that can redraw, plain
    periodic lines on a dumb terminal, a pipe or with --no-progress; None with --quiet."""
    from harvester.display import LiveDisplay, PlainDisplay, use_live

    if config.quiet:
        return None
    if config.progress and use_live(sys.stderr, env):
        return LiveDisplay(tally)
    return PlainDisplay(tally, interval=interval)


def _log_events(ev: Any) -> None:
    """The events as log records (for -v and --log-file): settled series at INFO, starts at DEBUG."""
    if ev.kind == "bytes":
        return  # once per network chunk: return at once
    log = logging.getLogger("harvester.run")
    if ev.kind in ("done", "skip"):
        log.info("%s: %s (%d files, %s bytes)", "complete" if ev.kind == "done" else "already complete",
                 ev.series_uid, ev.files, f"{ev.bytes:,}")
    elif ev.kind == "failed":
        log.info("failed: %s: %s", ev.series_uid, ev.message)
    elif ev.kind in ("retry", "series_retry"):
        log.info("%s%s: %s", "retry" if ev.kind == "retry" else "series retry",
                 f" {ev.series_uid}" if ev.series_uid else "", ev.message)
    elif ev.kind == "start":
        log.debug("start: %s", ev.series_uid)
    elif ev.kind in ("plan", "fetching"):
        log.info("%s: %s", ev.kind, json.dumps(ev.data))


def harvest_summary(result: Any, tally: Any, config: Config) -> dict[str, Any]:
    """The summary of a run as ``run --json`` prints it (keys documented in the README).

    ``failed`` counts the series that failed in this run; ``not_fetched`` those a fatal stop
    left untried (``fatal`` says why); ``complete_before`` those complete before the run."""
    from harvester.events import Failure

    known = {f.series_uid: f for f in tally.failures}
    failures, left = [], []
    for uid, reason in result.failed:
        if uid in known:
            f = known[uid]
            failures.append(Failure(uid, reason, f.collection, f.patient, f.description, f.kind))
        elif result.fatal is not None and reason == "failed":
            left.append(uid)    # never settled: the fatal stop came first
        else:
            failures.append(Failure(uid, reason))
    totals = result.totals
    return {
        "ok": result.ok,
        "planned": tally.total_series,
        "complete": totals.get("complete", 0),
        "complete_now": result.downloaded,
        "complete_before": result.skipped,
        "failed": len(failures),
        "unavailable": len(result.unavailable),
        "not_fetched": len(left),
        "files": totals.get("files", 0),
        "bytes": totals.get("bytes", 0),
        "received_bytes": tally.received_bytes,
        "seconds": round(tally.transfer_seconds, 3),
        "rate": round(tally.rate),
        "requests": result.requests,
        "retries": result.retries,
        "output": str(config.out_dir),
        "manifest": str(config.out_dir / "harvest.json"),
        "fatal": result.fatal,
        "failures": [{"SeriesInstanceUID": f.series_uid, "collection": f.collection, "patient": f.patient,
                      "description": f.description, "reason_class": f.reason_class, "detail": f.detail}
                     for f in failures],
        "unavailable_series": [{"SeriesInstanceUID": uid, "reason": reason} for uid, reason in result.unavailable],
    }


def print_harvest_summary(summary: dict[str, Any], out: Any) -> None:
    """The summary a user reads: counts that add up, the failures by name, and what to do."""
    from harvester.display import printable, terminal_width, wrapped
    from harvester.events import human_bytes, human_duration

    s = summary
    width = terminal_width(out)
    left = f", {s['not_fetched']} not fetched (the run stopped)" if s["not_fetched"] else ""
    print(f"{s['planned']:,} planned, {s['complete']:,} complete ({s['complete_now']:,} now, "
          f"{s['complete_before']:,} before), {s['failed']:,} failed, {s['unavailable']:,} unavailable{left}",
          file=out)
    moved = (f"received {human_bytes(s['received_bytes'])} in {human_duration(s['seconds'])} "
             f"({human_bytes(s['rate'])}/s)" if s["seconds"] else "nothing to download")
    print(f"{moved}, {s['requests']:,} requests, {s['retries']:,} retries", file=out)
    for f in s["failures"]:
        print(wrapped("  " + _named_failure(f), width), file=out)
    for u in s["unavailable_series"]:
        print(wrapped(printable(f"  unavailable: {u['SeriesInstanceUID']}: {u['reason']}"), width), file=out)
    print(f"output: {printable(s['output'])} ({s['files']:,} files, {human_bytes(s['bytes'])})", file=out)
    print(f"manifest: {printable(s['manifest'])}", file=out)
    if s["failed"]:
        print(f"rerun the same command to retry the {s['failed']:,} failed series", file=out)
    if s["unavailable"]:
        print(f"a rerun looks the {s['unavailable']:,} unavailable series up again "
              "(the archive did not give them: withdrawn, restricted or mistyped)", file=out)


def _named_failure(f: dict[str, Any]) -> str:
    from harvester.display import printable

    name = " ".join(p for p in (f["collection"], f["patient"], json.dumps(f["description"], ensure_ascii=False)
                                if f["description"] else "") if p)
    return printable(f"failed: {f['SeriesInstanceUID']}: {name + ': ' if name else ''}{f['reason_class']}: "
                     f"{f['detail']}")


def _run_harvest(query: Any, config: Config, env: dict[str, str] | None = None, *, runner: Any = None,
                 as_json: bool = False, interval: float = 10.0, extra: Any = None) -> int:
    """Run a harvest (``runner``: aharvest by default, or sync's) with its display, then print the
    summary: on stdout, or as one JSON object there with ``as_json`` (the text then on stderr).
    ``extra(summary)`` adds keys to the summary (sync's difference)."""
    from harvester.api import aharvest
    from harvester.events import Hub, human_bytes

    env = os.environ if env is None else env
    hub = Hub()
    hub.subscribe(_print_warning_event)  # warnings are said even with --quiet
    hub.subscribe(_log_events)
    display = _display(config, env, hub.tally, interval)
    if display is not None:
        hub.subscribe(display)

    def on_plan(plan: Any) -> None:
        if not config.quiet:
            t = _plan_totals(plan)
            print(f"planned {t['series']:,} series, {t['images']:,} images, {human_bytes(t['bytes'])} "
                  f"from {len(t['collections'])} collection(s); {plan.requests:,} requests",
                  file=sys.stderr, flush=True)
            _print_plan_notes(plan, listed=False)  # the summary lists them, after the progress

    run = runner or (lambda q, c, hub, on_plan: aharvest(q, c, hub=hub, on_plan=on_plan))
    import contextlib
    with display if display is not None else contextlib.nullcontext():
        result = anyio.run(lambda: run(query, config, hub, on_plan))
    summary = harvest_summary(result, hub.tally, config)
    if extra is not None:
        extra(summary)
    code = EXIT_FATAL if result.fatal else (EXIT_OK if result.ok else EXIT_FAILED)
    summary["exit_code"] = code
    if as_json:
        print(json.dumps(summary))
        if not config.quiet:
            print_harvest_summary(summary, sys.stderr)
    else:
        print_harvest_summary(summary, sys.stdout)
    if result.fatal:
        left = summary["not_fetched"] + summary["failed"]
        # the error's hint says what to do (free space, fix credentials... and run again)
        print(f"harvester: error: {result.fatal}" + (f"; {left:,} series left to fetch" if left else ""),
              file=sys.stderr)
    return code


def _dry_run(query: Any, config: Config, env: dict[str, str], as_json: bool) -> int:
    """``run --dry-run``: plan, leave out what DIR already holds complete, list the rest. Reads DIR
    (without its lock) and writes nothing anywhere."""
    from harvester.events import human_bytes
    from harvester.store.state import HarvestState

    plan = _plan_with_progress(query, config, env)
    _print_warnings(plan)
    state = HarvestState(config.out_dir)
    if (config.out_dir / "harvest.json").exists() or state.db_path.exists() or state.journal_path.exists():
        try:
            state.read()
        except OSError:
            pass  # unreadable: as if empty (run would say what is wrong with it)
    done = {uid for uid, rec in state.records.items() if isinstance(rec, dict) and rec.get("status") == "complete"}
    todo = [t for t in plan.tasks if t.series_uid not in done]
    size = sum(t.file_size or 0 for t in todo)
    if as_json:
        print(json.dumps({"dry_run": True, "planned": len(plan.tasks), "complete_before": len(plan.tasks) - len(todo),
                          "to_fetch": len(todo), "to_fetch_bytes": size,
                          "unavailable": len(plan.unavailable),
                          "unavailable_series": [u.to_json() for u in plan.unavailable],
                          "list": [_series_json(t) for t in todo]}))
    else:
        for task in todo:
            print(_series_line(task))
        print(f"dry run: {len(plan.tasks):,} planned, {len(plan.tasks) - len(todo):,} already complete in "
              f"{config.out_dir}, {len(todo):,} to fetch ({human_bytes(size)}); nothing was written")
    _print_plan_notes(plan, listed=True)
    return EXIT_FAILED if plan.unavailable else EXIT_OK


def cmd_run(args: argparse.Namespace, env: dict[str, str]) -> int:
    from harvester.query import load_query

    query = load_query(args.query)
    config = build_config(args, env, query.url or query.api, query.layout, query.source)
    if args.dry_run:
        return _dry_run(query, config, env, args.json)
    runner = None
    if args.cluster:
        from harvester import cluster

        cluster.require_dask()
        cluster.parse_cluster(args.cluster)

        def runner(q: Any, c: Config, hub: Any, on_plan: Any) -> Any:
            return cluster.aharvest(q, c, hub=hub, on_plan=on_plan, cluster=args.cluster,
                                    on_cluster=_cluster_info(c))
    return _run_harvest(query, config, env, runner=runner, as_json=args.json, interval=args.stats_interval)


def _cluster_info(config: Config) -> Any:
    """What ``--cluster`` says once the cluster is up (its workers, the dashboard link), on stderr."""
    def say(line: str) -> None:
        if not config.quiet:
            print(line, file=sys.stderr, flush=True)
    return say


def cmd_sync(args: argparse.Namespace, env: dict[str, str]) -> int:
    from harvester.operations import async_sync
    from harvester.query import load_query

    query = load_query(args.query)
    config = build_config(args, env, query.url or query.api, query.layout, query.source)
    if args.dry_run:
        result = anyio.run(lambda: async_sync(query, config, prune=args.prune, dry_run=True))
        d = result.diff
        if args.json:
            print(json.dumps({"dry_run": True, "new": list(d.new), "changed": list(d.changed),
                              "unchanged": len(d.unchanged), "removed": list(d.removed), "prune": args.prune,
                              "unavailable_series": [{"SeriesInstanceUID": u, "reason": r}
                                                     for u, r in result.unavailable]}))
            return EXIT_FAILED if result.unavailable else EXIT_OK
        print(f"dry run: {len(d.new)} new, {len(d.changed)} changed, {len(d.unchanged)} unchanged, "
              f"{len(d.removed)} no longer selected{' (would be pruned)' if args.prune else ''}")
        for label, uids in (("new", d.new), ("changed", d.changed), ("removed", d.removed)):
            for uid in uids:
                print(f"  {label}: {uid}")
        if result.unavailable:
            print(f"{len(result.unavailable)} series unavailable (the archive does not give them):")
            for uid, reason in result.unavailable:
                print(f"  unavailable: {uid}: {reason}")
        return EXIT_FAILED if result.unavailable else EXIT_OK
    holder: dict[str, Any] = {}
    sync_run: Any = async_sync
    if args.cluster:
        from harvester import cluster

        cluster.require_dask()
        cluster.parse_cluster(args.cluster)
        sync_run = functools.partial(cluster.async_sync, cluster=args.cluster, on_cluster=_cluster_info(config))

    async def go(query: Any, config: Config, hub: Any, on_plan: Any) -> Any:
        result = await sync_run(query, config, prune=args.prune, hub=hub)
        holder["sync"] = result
        return result.harvest

    def add_diff(summary: dict[str, Any]) -> None:
        sync = holder.get("sync")
        if sync is not None:
            d = sync.diff
            summary["sync"] = {"new": len(d.new), "changed": len(d.changed), "unchanged": len(d.unchanged),
                               "removed": len(d.removed), "pruned": len(sync.pruned)}

    code = _run_harvest(query, config, env, runner=go, as_json=args.json, interval=args.stats_interval,
                        extra=add_diff)
    sync = holder.get("sync")
    if sync is not None and not args.json:
        d = sync.diff
        print(f"sync: {len(d.new)} new, {len(d.changed)} changed, {len(d.unchanged)} unchanged, "
              f"{len(d.removed)} no longer selected, {len(sync.pruned)} pruned")
    return code


def cmd_status(args: argparse.Namespace, env: dict[str, str]) -> int:
    from harvester.store.tree import read_status
    from harvester.events import human_bytes

    st = read_status(args.dir)
    if args.json:
        print(json.dumps(st, indent=1))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from harvester.display import printable

    table = Table(title=Text(printable(f"{args.dir}: last sync {st['last_sync'] or 'never'}, disk use "
                                       f"{human_bytes(st['disk_bytes'])}")))
    for col in ("collection", "series", "complete", "failed", "files", "size"):
        table.add_column(col, justify="left" if col == "collection" else "right")
    for name, c in st["collections"].items():  # names come from harvest.json: Text, never markup
        table.add_row(Text(printable(str(name))), str(c["series"]), str(c["complete"]), str(c["failed"]),
                      str(c["files"]), human_bytes(c["bytes"]))
    Console(highlight=False).print(table)
    for f in st["failures"]:
        print(printable(f"{'unavailable' if f.get('status') == 'unavailable' else 'failed'}: "
                        f"{f['SeriesInstanceUID']}: {f['error']}"))
    return EXIT_OK


#: DIR's own files: written only by the harvester itself, never as another command's output
OWN_FILES = ("harvest.json", "metadata.csv", "metadata/metadata.csv", "report.html")


def check_not_harvest_file(out_dir: Path, target: Path | None, option: str, *, allow: tuple[str, ...] = ()) -> None:
    """Raises ``UsageError`` when ``target`` (links followed, as the write would) is one of
    ``out_dir``'s own files, lies in its ``.harvester/`` or in one of its folders (the series'):
    an output option must never overwrite what the harvest holds. A new file directly in
    ``out_dir`` (``DIR/series.csv``) is allowed, as are ``-`` and the names in ``allow``."""
    if target is None or str(target) == "-":
        return
    root = os.path.realpath(out_dir)
    where = os.path.realpath(target)
    if not where.startswith(root + os.sep):
        return
    rel = os.path.relpath(where, root)
    if os.sep in rel or rel in OWN_FILES or rel == ".harvester":
        if rel in allow:
            return
        raise UsageError(f"{option} {target} is among the harvest's own files in {out_dir} ({rel}): "
                         "writing it could destroy what is harvested",
                         hint="write it outside DIR, or directly in DIR under a new name")


def cmd_report(args: argparse.Namespace, env: dict[str, str]) -> int:
    from harvester.report import write_report

    check_not_harvest_file(args.dir, args.out, "-o", allow=("report.html",))
    # What was written goes to stderr: stdout may be the report itself (-o -, -o /dev/stdout).
    print(f"wrote {write_report(args.dir, args.out)}", file=sys.stderr)
    return EXIT_OK


def cmd_export(args: argparse.Namespace, env: dict[str, str]) -> int:
    from harvester.store.state import export_jsonl, rewrite_exports
    from harvester.store.tree import export_csv, export_tcia

    if not args.tcia and not args.csv and not args.jsonl and not args.manifest:
        raise UsageError("export needs --tcia FILE, --csv FILE, --jsonl FILE and/or --manifest")
    if [str(args.tcia), str(args.csv), str(args.jsonl)].count("-") > 1:
        raise UsageError("two of --tcia -, --csv - and --jsonl - would both write to stdout",
                         hint="send all but one of them to a file")
    for option, target in (("--tcia", args.tcia), ("--csv", args.csv), ("--jsonl", args.jsonl)):
        check_not_harvest_file(args.dir, target, option)
    if args.manifest:
        totals = rewrite_exports(args.dir)
        print(f"wrote {args.dir / 'harvest.json'} and metadata.csv: {totals['series']} series", file=sys.stderr)
    if args.jsonl:
        print(f"wrote {args.jsonl}: {export_jsonl(args.dir, args.jsonl)} series", file=sys.stderr)
    # What was written goes to stderr: stdout may be the export itself (-, /dev/stdout).
    if args.tcia:
        print(f"wrote {args.tcia}: {export_tcia(args.dir, args.tcia)} series", file=sys.stderr)
    if args.csv:
        print(f"wrote {args.csv}: {export_csv(args.dir, args.csv)} series", file=sys.stderr)
    return EXIT_OK


def verify_summary(result: Any, refused: list[str]) -> dict[str, Any]:
    """What ``verify --json`` prints (keys documented in the README)."""
    def named(rec: dict[str, Any]) -> dict[str, Any]:
        meta = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
        return {"SeriesInstanceUID": str(rec.get("SeriesInstanceUID")), "collection": str(rec.get("Collection") or ""),
                "patient": str(rec.get("PatientID") or ""), "description": str(meta.get("SeriesDescription") or ""),
                "status": str(rec.get("status") or "failed"), "error": str(rec.get("error") or "")}
    refused = list(dict.fromkeys([*result.refused, *refused]))
    return {"ok": result.ok and not refused, "checked": result.checked, "intact": result.intact,
            "failed": len(result.failed), "unavailable": len(result.unavailable), "missing": result.missing,
            "damaged_files": len(result.problems), "extra_files": len(result.extra), "files": result.files,
            "bytes": result.bytes, "problems": list(result.problems), "extra": list(result.extra),
            "failures": [named(r) for r in result.failed + result.unavailable], "refused": list(refused)}


def cmd_verify(args: argparse.Namespace, env: dict[str, str]) -> int:
    import contextlib

    from harvester.api import verify_tree
    from harvester.display import printable
    from harvester.events import Event, Hub, human_bytes

    out = sys.stderr if args.json else sys.stdout  # with --json, stdout holds the JSON object only
    refused: list[str] = []
    if args.repair:
        from harvester.operations import async_repair
        kind, url = _recorded_source(args.dir)
        config = build_config(args, env, url, manifest_source=kind)
        config = Config(**{**config.__dict__, "out_dir": args.dir, "progress": False})
        rep = anyio.run(lambda: async_repair(config))
        for path in rep.repaired_files:
            print(f"repaired: {path}", file=out)
        for uid in rep.refetched_series:
            print(f"refetched series: {uid}", file=out)
        print(f"{len(rep.damaged)} damaged file(s), {len(rep.failed_series)} failed and {len(rep.missing_series)} "
              f"missing series: {len(rep.repaired_files)} files repaired alone, {len(rep.refetched_series)} series "
              "refetched", file=out)
        if rep.harvest is not None and rep.harvest.fatal:
            print(f"harvester: error: {rep.harvest.fatal}", file=sys.stderr)
            return EXIT_FATAL
        refused = list(rep.refused)
        for line in refused:
            print(printable(f"refused: {line}"), file=out)
    hub = Hub()
    progress = Config(progress=not args.no_progress, quiet=args.json and not args.verbose)
    display = _display(progress, env, hub.tally, args.stats_interval)
    if display is not None:
        hub.subscribe(display)
    hub.emit(Event("verify"))
    with display if display is not None else contextlib.nullcontext():
        result = verify_tree(args.dir, on_file=lambda size: hub.emit(Event("checked", bytes=size, files=1)),
                             on_total=lambda files, size: hub.emit(Event("verify", data={"files": files,
                                                                                         "bytes": size})))
        hub.emit(Event("finish"))   # the last frame: the rate stops counting, no ETA left
    for rec in result.failed + result.unavailable:
        meta = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
        name = " ".join(str(v) for v in (rec.get("Collection"), rec.get("PatientID"),
                                         f'"{meta["SeriesDescription"]}"' if meta.get("SeriesDescription") else None)
                        if v)
        print(printable(f"{rec.get('status') or 'failed'}: {name} {rec.get('SeriesInstanceUID')}: "
                        f"{rec.get('error') or 'no reason recorded'}"), file=out)
    for problem in result.problems:
        print(printable(f"damaged: {problem}"), file=out)
    for path in result.extra:
        print(printable(f"extra: {path} (no record lists it)"), file=out)
    print(f"verified {result.files} files ({human_bytes(result.bytes)}); {result.summary()}", file=out)
    if result.failed or result.missing:
        print(f"to fetch the {len(result.failed) + result.missing} failed or missing series, run the same "
              f"harvester run (or sync) command again, or harvester verify {args.dir} --repair", file=out)
    if result.problems:
        print(f"to refetch the damaged files: harvester verify {args.dir} --repair", file=out)
    if result.extra:
        print("extra files are left alone: move them out of the series folders if they are not part of the harvest",
              file=out)
    summary = verify_summary(result, refused)
    code = EXIT_OK if summary["ok"] else EXIT_FAILED
    if args.json:
        print(json.dumps({**summary, "exit_code": code}))
    return code


def cmd_demo(args: argparse.Namespace, env: dict[str, str]) -> int:
    from harvester.demo import demo_server

    cache = args.cache_dir or Path(env.get("HARVESTER_CACHE") or Path.home() / ".cache" / "harvester")
    print(f"demo: building a synthetic archive ({args.synthetic}) in {cache} ...", file=sys.stderr, flush=True)
    with demo_server(args.synthetic, args.faults or None, cache) as (base_url, query):
        print(f"demo: serving it at {base_url} (loopback only) with faults: {args.faults or 'none'}",
              file=sys.stderr, flush=True)
        # Short backoffs: the demo server is local, and its faults are there to show the retries.
        config = Config(api_url=base_url, out_dir=args.dir, workers=4, connections=8, backoff_base=0.1,
                        backoff_max=2.0, retries=6, series_retries=5, read_timeout=10.0,
                        progress=not args.no_progress)
        code = _run_harvest(query, config, env)
    print(f"demo: look at {args.dir}/ (DICOM tree), {args.dir}/harvest.json and {args.dir}/metadata.csv; "
          f"'harvester verify {args.dir}' re-checks every file; rerunning 'make demo' resumes (nothing to fetch).")
    return code


class _Stderr:
    """sys.stderr looked up at each write: a live display may stand in for it meanwhile."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _Redacting(logging.Filter):
    """Every log record passes ``harvester.redact.redact`` before any handler writes it, and its
    control characters are shown as ``\\xNN`` (stderr and a tailed --log-file are terminals)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from harvester.redact import printable, redact

        record.msg, record.args = printable(redact(record.getMessage())), None
        return True


def setup_logging(verbose: int, log_file: Path | None) -> logging.Handler | None:
    """The library's log on stderr (warnings; ``-v`` info, ``-vv`` debug: ``harvester: info: ...``),
    and with ``log_file`` a timestamped copy appended to it (info, or debug with -vv). Secrets are
    redacted on the way to both. Does nothing when the caller configured logging already (only
    when ``log_file`` is None). Returns the file's handler, for the caller to close. Raises
    ``OSError`` when ``log_file`` cannot be opened (its folder is never created)."""
    root = logging.getLogger()
    if root.handlers and log_file is None:
        return None
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL):
        logging.addLevelName(level, logging.getLevelName(level).lower())  # harvester: warning: ...
    stderr_level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING
    handlers: list[logging.Handler] = []
    if not root.handlers:
        console = logging.StreamHandler(_Stderr())  # type: ignore[arg-type]
        console.setLevel(stderr_level)
        console.setFormatter(logging.Formatter("harvester: %(levelname)s: %(message)s"))
        handlers.append(console)
    file_level, file_handler = stderr_level, None
    if log_file is not None:
        handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        file_level = min(stderr_level, logging.DEBUG if verbose >= 2 else logging.INFO)
        handler.setLevel(file_level)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(handler)
        file_handler = handler
    for handler in handlers:
        handler.addFilter(_Redacting())
        root.addHandler(handler)
    root.setLevel(min(stderr_level, file_level))
    logging.getLogger("aiohttp").setLevel(logging.WARNING)  # its access details are not ours to log
    return file_handler


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(serve="serve" in words)   # any other command never reaches serve's options
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    env = dict(os.environ)
    harvest_dir = getattr(args, "dir", None) or (getattr(args, "out", None) if args.command in ("run", "sync") else None)
    if harvest_dir is not None:
        try:
            check_not_harvest_file(harvest_dir, getattr(args, "log_file", None), "--log-file")
        except UsageError as exc:
            print(f"harvester: error: {exc.one_line()}", file=sys.stderr)
            return EXIT_USAGE
    try:
        log_handler = setup_logging(getattr(args, "verbose", 0), getattr(args, "log_file", None))
    except OSError as exc:
        print(f"harvester: error: cannot append to --log-file {args.log_file}: {exc.strerror} "
              "(give a writable file in an existing folder)", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _dispatch(args, env)
    finally:
        if log_handler is not None:
            logging.getLogger().removeHandler(log_handler)
            log_handler.close()


def _dispatch(args: argparse.Namespace, env: dict[str, str]) -> int:
    commands = {"run": cmd_run, "plan": cmd_plan, "query": cmd_query, "verify": cmd_verify, "demo": cmd_demo,
                "sync": cmd_sync, "status": cmd_status, "export": cmd_export, "report": cmd_report}
    try:
        if args.command == "serve":
            from harvester.server.serve import run_serve
            return run_serve(args)
        return commands[args.command](args, env)
    except KeyboardInterrupt:
        print("harvester: interrupted; verified series are kept, run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as exc:
        print(f"harvester: error: {exc.one_line()}", file=sys.stderr)
        return EXIT_USAGE
    except FatalError as exc:
        print(f"harvester: error: {exc.one_line()}", file=sys.stderr)
        return EXIT_FATAL
    except RequestError as exc:
        print(f"harvester: error: {exc.one_line()}", file=sys.stderr)
        return EXIT_USAGE if exc.status == 400 else EXIT_FATAL
    except HarvesterError as exc:
        print(f"harvester: error: {exc.one_line()}", file=sys.stderr)
        return EXIT_FATAL
    except BrokenPipeError:
        return EXIT_OK


def console() -> None:
    """The ``harvester`` command (and ``python -m harvester``): ``main``, then ``exit_now``."""
    exit_now(main())


def exit_now(code: int | None) -> None:
    """Exit with ``code`` after what a normal exit does that matters, in the interpreter's order:
    ``threading._shutdown`` (the thread pools told to stop, then the threads that are not daemons
    joined), the ``atexit`` handlers (logging's flush, temporary folders), stdout and stderr
    flushed; then ``os._exit``, skipping only the interpreter's teardown of every module
    (aiohttp, asyncio, pyarrow and numpy for an IDC run): about 60 ms of the time after a
    harvest's last byte, where nothing is left to write (bench/RESULTS.md).

    Not a join of every thread by hand: an idle worker of a ``ThreadPoolExecutor`` (Dask's
    offload thread in a ``--cluster local:N`` run) is no daemon and waits for work until the
    pool's own exit hook tells it to stop, which ``threading._shutdown`` runs first."""
    import atexit
    import threading

    code = code if isinstance(code, int) else 0
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):   # the reader closed the pipe: as in _dispatch, not an error
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    console()
