"""``harvester demo``: a synthetic archive served on loopback, to be harvested for real.

``demo_server`` builds (or loads from cache) the synthetic archive, serves it with the
NBIA-compatible server in a background thread on a free loopback port, and yields the base URL
and a query that selects every collection. No network beyond 127.0.0.1 is used.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from harvester.query import Query, query_from_dict


@contextlib.contextmanager
def demo_server(synthetic: str, faults: str | None, cache_dir: Path) -> Iterator[tuple[str, Query]]:
    from harvester.server.faults import FaultSpec
    from harvester.server.synthetic import SyntheticSpec, build_synthetic
    from harvester.server.testing import serve_in_thread

    try:
        spec = SyntheticSpec.parse(synthetic)
        fault_spec = FaultSpec.parse(faults) if faults else None
    except ValueError as exc:
        from harvester.errors import UsageError
        raise UsageError(f"demo: {exc}") from None
    archive = build_synthetic(spec, cache_dir / "synthetic")
    collections = sorted({str(rec.row.get("Collection")) for rec in archive.series.values()
                          if getattr(rec, "hostile_kind", None) is None})
    query = query_from_dict({"select": [{"collection": c} for c in collections]}, origin="demo")
    with serve_in_thread(archive, faults=fault_spec) as handle:
        yield handle.base_url, query
