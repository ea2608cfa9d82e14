"""Run tcia_utils against our loopback server, as a user would: list the series of each
collection with ``nbia.getSeries``, then ``nbia.downloadSeries(rows, path=OUT)`` with the
library's defaults (10 threads, whole ZIP in memory, no retry, no MD5 check).

    python bench/peer_tcia_utils.py --api BASE_URL --out DIR --collections A,B [--threads N] [--limit N]
    python bench/peer_tcia_utils.py --api BASE_URL --collections A,B --plan-only

tcia_utils hard-codes TCIA's hosts in ``setApiUrl``; it is replaced by one returning our base
URL (as tests/test_peers.py does). Neither listing nor download is retried by the library; a
listing that fails (None) is asked again up to 5 times here so that a download comparison is
not lost to one injected 500 before it starts. Prints one JSON line: series listed and asked for.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api", required=True, help="base URL ending in /v4")
    parser.add_argument("--out", default="tciaDownload")
    parser.add_argument("--collections", required=True, help="comma-separated")
    parser.add_argument("--threads", type=int, default=None, help="max_workers (library default 10)")
    parser.add_argument("--limit", type=int, default=None, help="download only the first N series")
    parser.add_argument("--plan-only", action="store_true", help="only list the series (getSeries per collection)")
    args = parser.parse_args()

    from tcia_utils import nbia

    logging.getLogger("tcia_utils").setLevel(logging.ERROR)
    base = args.api.rstrip("/") + "/"
    nbia.setApiUrl = lambda endpoint, api_url="": base  # type: ignore[assignment]

    started = time.monotonic()
    rows: list[dict] = []
    listing_calls = 0
    for collection in args.collections.split(","):
        for _ in range(5):
            listing_calls += 1
            got = nbia.getSeries(collection=collection)
            if got is not None:
                rows.extend(got)
                break
    listed = time.monotonic()
    summary = {"listed": len(rows), "listing_calls": listing_calls, "list_seconds": round(listed - started, 3)}
    if not args.plan_only:
        chosen = rows[: args.limit] if args.limit else rows
        kwargs = {"max_workers": args.threads} if args.threads else {}
        nbia.downloadSeries(chosen, path=args.out, **kwargs)
        summary.update(asked=len(chosen), uids=[r["SeriesInstanceUID"] for r in chosen],
                       download_seconds=round(time.monotonic() - listed, 3))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
