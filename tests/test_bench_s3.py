"""The bench's static S3 server (bench/s3.py) holds a connection open across GETs, as S3 does,
with and without its link faults: one that closed each connection after its first answer made
every client of scenario h connect once per object."""
from __future__ import annotations

import hashlib
import http.client
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parent.parent


def _bench_s3(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(REPO / "bench"))   # it imports its sibling harness.py
    spec = importlib.util.spec_from_file_location("bench_s3", REPO / "bench" / "s3.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_s3", module)   # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("faults", ["", "latency=5ms", "latency=5ms,total_rate=64MiB"])
def test_the_static_s3_keeps_a_connection_alive_across_gets(tmp_path: Path, faults: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    s3 = _bench_s3(monkeypatch)
    body = os.urandom(200_000)
    path = tmp_path / "object.dcm"
    path.write_bytes(body)
    obj = s3.BucketObject(key="series/object.dcm", path=str(path), size=len(body), md5=hashlib.md5(body).hexdigest())
    with s3.StaticS3([obj], tmp_path / "server", faults=faults) as server:
        url = urlsplit(server.url)
        conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
        sockets = []
        try:
            for _ in range(3):
                conn.request("GET", f"/{s3.BUCKET}/{obj.key}")
                resp = conn.getresponse()
                assert resp.status == 200 and resp.read() == body
                assert resp.getheader("ETag") == f'"{obj.md5}"'
                sockets.append(conn.sock)
        finally:
            conn.close()
        stats = server.stats()
    assert sockets[0] is not None and all(s is sockets[0] for s in sockets)   # one connection, never a new one
    assert stats["gets"] == 3 and stats["last_byte"] >= stats["first_request"] > 0
