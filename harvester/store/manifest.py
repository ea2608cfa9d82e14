"""The one reader of ``harvest.json``: every part that reads a harvest (the state, sync and
repair, status and exports, the report, the CLI) reads it here, so the same broken file fails
the same way everywhere.

``read_manifest(out_dir)`` returns the document: a JSON object whose ``series`` is a list (its
records are still hostile: ``harvester.store.state.usable_records`` checks them one by one). It
reads without following a link and without blocking on a FIFO (``containment.read_bytes``).

* ``UsageError`` when ``out_dir`` holds no harvest.json (not a harvest output directory);
* ``ManifestError`` when it cannot be read, is not JSON (or nested deeper than the parser
  goes), or is not a harvest manifest (no object, no list of series). The message names the
  file and says what to do; the state rebuilds a damaged one from the journal.

``recorded_source(header)`` is the archive a harvest came from: ``(kind, url)``. Files written
before the source was recorded (no ``source`` object, or one that cannot be read) are NBIA at
``api_url``, which is what they were.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harvester.config import SOURCES
from harvester.containment import read_bytes
from harvester.errors import ManifestError, UsageError

MANIFEST_NAME = "harvest.json"
REBUILD_HINT = "run the harvest again to rewrite it from the journal"


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """``out_dir/harvest.json`` as a dict with a ``series`` list (see the module docstring for
    what is raised)."""
    path = out_dir / MANIFEST_NAME
    try:
        raw = read_bytes(path)   # never through a link, never blocked on a FIFO
    except FileNotFoundError:
        raise UsageError(f"{out_dir} holds no harvest.json: it is not a harvest output directory",
                         hint="give the directory you harvested into (the -o DIR of harvester run)") from None
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror or type(exc).__name__}", hint=REBUILD_HINT) from None
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise ManifestError(f"cannot read {path}: JSON nested too deep", hint=REBUILD_HINT) from None
    except UnicodeDecodeError:
        raise ManifestError(f"cannot read {path}: not UTF-8 text", hint=REBUILD_HINT) from None
    except ValueError as exc:
        raise ManifestError(f"cannot read {path}: not JSON ({exc})", hint=REBUILD_HINT) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("series", []), list):
        raise ManifestError(f"{path} is not a harvest manifest (no list of series)", hint=REBUILD_HINT)
    doc.setdefault("series", [])
    return doc


def recorded_source(header: dict[str, Any]) -> tuple[str, str | None]:
    """(kind, URL or None) of the archive ``header`` (harvest.json without its series) records.

    Reads ``{"source": {"kind": ..., "url": ...}}``; a kind outside ``config.SOURCES`` or a URL
    that is not an http(s) string is not used (hostile or damaged), and the file is read as the
    older ones are: NBIA at ``api_url``."""
    source = header.get("source")
    legacy = header.get("api_url")
    legacy_url = legacy if _is_url(legacy) else None
    if isinstance(source, dict) and source.get("kind") in SOURCES:
        url = source.get("url")
        return str(source["kind"]), url if _is_url(url) else legacy_url
    return "nbia", legacy_url


def _is_url(value: Any) -> bool:
    return (isinstance(value, str) and value.startswith(("http://", "https://")) and len(value) < 4096
            and value.isprintable() and " " not in value)
