"""Run nbiatoolkit against our loopback server, as a user would: ``NBIAClient.getSeries``
per collection, then ``downloadSeries(uids, downloadDir=OUT)`` with the library's defaults
(1 process, whole ZIP in memory, MD5 check, files sorted by a tag pattern, no retry).

    python bench/peer_nbiatoolkit.py --api BASE_URL --out DIR --collections A,B [--processes N] [--limit N]

nbiatoolkit takes its base URL from an Enum member; it is replaced by an object with
``.value`` (picklable, for its process pool) and the OAuth2 client pointed at our token
endpoint, as tests/test_peers.py does. The client is never used as a context manager: its
``__exit__`` logs out at the real host. A listing that raises is asked again up to 5 times
here (the library does not retry). Prints one JSON line: series listed and asked for.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api", required=True, help="base URL ending in /v4")
    parser.add_argument("--out", default="NBIA-Download")
    parser.add_argument("--collections", required=True, help="comma-separated")
    parser.add_argument("--processes", type=int, default=None, help="nParallel (library default 1)")
    parser.add_argument("--limit", type=int, default=None, help="download only the first N series")
    args = parser.parse_args()

    import nbiatoolkit

    services = args.api.split("/nbia-api/")[0] + "/nbia-api/services/"
    client = nbiatoolkit.NBIAClient(log_level="ERROR")
    client._base_url = types.SimpleNamespace(value=services)
    client._oauth2_client.base_url = services

    started = time.monotonic()
    uids: list[str] = []
    listing_calls = 0
    for collection in args.collections.split(","):
        for attempt in range(5):
            listing_calls += 1
            try:
                rows = client.getSeries(Collection=collection)
            except Exception:  # noqa: BLE001 - the library raises requests' errors as they come
                if attempt == 4:
                    raise
                continue
            uids.extend(r["SeriesInstanceUID"] for r in rows)
            break
    listed = time.monotonic()
    chosen = uids[: args.limit] if args.limit else uids
    kwargs = {"nParallel": args.processes} if args.processes else {}
    ok = client.downloadSeries(chosen, downloadDir=args.out, **kwargs)
    print(json.dumps({"listed": len(uids), "listing_calls": listing_calls, "asked": len(chosen), "uids": chosen,
                      "reported_success": bool(ok), "list_seconds": round(listed - started, 3),
                      "download_seconds": round(time.monotonic() - listed, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
