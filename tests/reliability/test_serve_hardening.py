"""``harvester serve`` against hostile clients: traversal in parameters and paths, oversized
requests, slow and stalled clients, the bind address, directory listings."""
from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest

from harvest_helpers import harvest, manifest, normal_series, select_all, serve_synthetic
from harvester.server.archive import Archive, load_harvest_dir
from harvester.store.db import StateDB
from harvester.server.serve import start_server
from harvester.server.testing import serve_in_thread

SPEC = "collections=1,patients=2,series=2,instances=3,size=4KiB,seed=66"
V4 = "/nbia-api/services/v4"
SECRET = "harvester-serve-secret-7f3a9c"   # in a file next to the served DIR, never to be served


def request(port: int, method: str, target: str, *, headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, bytes]:
    """One raw HTTP request: the target is sent exactly as given (no normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
            conn.putheader("Content-Type", "application/x-www-form-urlencoded")
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (ConnectionError, http.client.HTTPException):
        return 0, b""  # the server closed the connection: it served nothing
    finally:
        conn.close()


def port_of(base_url: str) -> int:
    return int(base_url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def harvested(tmp_path_factory, small_archive) -> Iterator[tuple[Path, Archive]]:
    """A harvested DIR (served by ``load_harvest_dir``) with a secret file beside it, a file inside
    it that harvest.json does not list, and a listed file replaced by a symlink to the secret."""
    root = tmp_path_factory.mktemp("served")
    (root / "secret.txt").write_text(SECRET)
    out = root / "harvest"
    with serve_in_thread(small_archive) as srv:
        assert harvest(srv.base_url, out, select_all(small_archive)).ok
    (out / "unlisted.txt").write_text(SECRET)
    doc = manifest(out)
    victim = out / doc["series"][0]["files"][0]["path"]
    victim.unlink()
    victim.symlink_to(root / "secret.txt")
    doc["series"][1]["files"][0]["path"] = "../secret.txt"   # a hostile entry of the state database
    (out / "harvest.json").write_text(json.dumps(doc))
    db = StateDB(out / ".harvester" / "state.db")           # what serve reads the records from
    db.open()
    db.put(doc["series"][1]["SeriesInstanceUID"], doc["series"][1], "a hand edit")
    db.close()
    yield out, load_harvest_dir(out)


TRAVERSALS = [
    "../../../../../../etc/passwd", "..%2F..%2F..%2F..%2Fetc%2Fpasswd", "/etc/passwd", "....//....//etc/passwd",
    "..\\..\\..\\etc\\passwd", "%2e%2e/%2e%2e/etc/passwd", "../secret.txt", "../../secret.txt", "unlisted.txt",
    "harvest.json", "%00../../etc/passwd", "../" * 40 + "etc/passwd",
]


def traversal_targets(archive: Archive) -> list[str]:
    rec = archive.records()[0]
    sop = rec.instances[0].sop_uid
    targets = []
    for bad in TRAVERSALS:
        q = quote(bad, safe="%/")
        targets += [
            f"{V4}/getImage?SeriesInstanceUID={q}",
            f"{V4}/getImageWithMD5Hash?SeriesInstanceUID={q}",
            f"{V4}/getSingleImage?SeriesInstanceUID={rec.uid}&SOPInstanceUID={q}",
            f"{V4}/getSingleImage?SeriesInstanceUID={q}&SOPInstanceUID={sop}",
            f"{V4}/getSingleImage?SeriesInstanceUID={rec.uid}&SOPInstanceUID={quote('../' + sop, safe='')}",
            f"{V4}/getMD5HashForImage?SOPInstanceUID={q}",
            f"{V4}/getSeriesSize?SeriesInstanceUID={q}",
            f"{V4}/getSOPInstanceUIDs?SeriesInstanceUID={q}",
            f"{V4}/getSeries?Collection={q}",
            f"{V4}/{q}",
            f"/nbia-api/services/{q}",
            f"/{q}",
            f"/_harvester/{q}",
        ]
    return targets


def assert_nothing_leaks(port: int, targets: list[str], forbidden: list[bytes]) -> int:
    for target in targets:
        status, body = request(port, "GET", target)
        for needle in forbidden:
            assert needle not in body, (target, status, body[:200])
        if status == 200:
            # only the API's own answers: JSON, the empty body of no match, an MD5 hex digest, or a
            # ZIP/DICOM the archive vouched for
            assert body[:1] in (b"[", b"{", b"") or len(body) == 32 or body[:2] == b"PK" or body[128:132] == b"DICM", \
                (target, body[:100])
    return len(targets)


def test_traversal_never_serves_a_file_outside_the_archive(harvested, small_archive, figures):
    out, archive = harvested
    assert len(archive) == len(normal_series(small_archive)) - 2  # the tampered series are not served
    forbidden = [SECRET.encode(), b"root:x:0:0", b"root:*:0:0"]
    tried = 0
    with serve_in_thread(archive) as srv:
        tried += assert_nothing_leaks(port_of(srv.base_url), traversal_targets(archive), forbidden)
        status, body = request(port_of(srv.base_url), "GET", f"{V4}/getSeries")
        assert status == 200 and len(json.loads(body)) == len(archive)
    with serve_in_thread(small_archive) as srv:
        tried += assert_nothing_leaks(port_of(srv.base_url), traversal_targets(small_archive), forbidden)
    figures.record("serve", case="traversal in parameters and paths", requests=tried)


def test_no_directory_listing(harvested, figures):
    out, archive = harvested
    rel_dir = manifest(out)["series"][2]["path"]
    file_rel = manifest(out)["series"][2]["files"][0]["path"]
    paths = ["/", "/nbia-api", "/nbia-api/", "/nbia-api/services", "/nbia-api/services/", f"{V4}", f"{V4}/",
             "/nbia-api/services/v1/", "/_harvester/", "/harvest.json", "/metadata.csv", "/.harvester/journal.jsonl",
             "/" + quote(rel_dir), "/" + quote(rel_dir) + "/", "/" + quote(file_rel), "/licenses/", "/static/",
             "/index.html", "/?C=M;O=D"]
    names = [n.encode() for n in ("harvest.json", "journal", ".dcm", "licenses", "Index of", "<a href")]
    with serve_in_thread(archive) as srv:
        for path in paths:
            status, body = request(port_of(srv.base_url), "GET", path)
            assert status in (400, 404, 405), (path, status)
            for needle in names:
                assert needle not in body, (path, body[:200])
    figures.record("serve", case="no directory listing", requests=len(paths))


@contextmanager
def serve_process(cache: Path, *extra: str) -> Iterator[str]:
    with serve_synthetic(SPEC, cache, *extra) as url:
        yield url


def test_binds_to_loopback_by_default(synthetic_cache, figures):
    with serve_process(synthetic_cache) as url:
        assert url.startswith("http://127.0.0.1:")
        port = port_of(url)
        assert request(port, "GET", f"{V4}/getCollectionValues")[0] == 200
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True)
        if listening.returncode == 0 and listening.stdout.strip():
            local = [line.split()[3] for line in listening.stdout.splitlines()]
            assert local == [f"127.0.0.1:{port}"], local
        other = _non_loopback_address()
        if other is not None:
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=5).close()
    figures.record("serve", case="binds to loopback by default", requests=1)


def _non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks a route
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


def test_oversized_requests_get_4xx_and_the_server_keeps_serving(synthetic_cache, figures):
    with serve_process(synthetic_cache) as url:
        port = port_of(url)
        huge = "A" * 100_000
        cases = [
            ("GET", f"{V4}/getSeries?Collection={huge}", None, None),
            ("GET", f"{V4}/getSeries?" + "&".join(f"p{i}=1" for i in range(5000)), None, None),
            ("GET", f"{V4}/getCollectionValues", {"X-Big": huge}, None),
            ("GET", f"{V4}/getCollectionValues", {f"X-H{i}": "v" for i in range(500)}, None),
            ("GET", "/" + huge, None, None),
            ("POST", "/nbia-api/oauth/token", None, b"grant_type=password&username=" + b"u" * 5_000_000),
        ]
        for method, target, headers, body in cases:
            status, _ = request(port, method, target, headers=headers, body=body)
            assert status == 0 or 400 <= status < 500, (target[:80], status)
            ok, payload = request(port, "GET", f"{V4}/getCollectionValues")
            assert ok == 200 and json.loads(payload), "the server stopped serving after an oversized request"
    figures.record("serve", case="oversized requests", requests=len(cases))


def test_slow_and_stalled_clients_do_not_starve_a_normal_client(synthetic_cache, figures):
    """50 clients send half a request and stall, 20 more dribble a header byte by byte, 20 start
    a download and never read it: a normal client is still served, and its download completes."""
    with serve_process(synthetic_cache) as url:
        port = port_of(url)
        status, body = request(port, "GET", f"{V4}/getSeries")
        uid = json.loads(body)[0]["SeriesInstanceUID"]
        socks: list[socket.socket] = []
        try:
            for i in range(50):
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(f"GET {V4}/getCollectionValues HTTP/1.1\r\nHost: x\r\nX-Slow: {i}".encode())
                socks.append(s)
            dribblers = []
            for _ in range(20):
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"G")
                dribblers.append(s)
            socks += dribblers
            for _ in range(20):
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.sendall(f"GET {V4}/getImage?SeriesInstanceUID={uid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                socks.append(s)
            for s in dribblers:
                s.sendall(b"E")
            status, payload = request(port, "GET", f"{V4}/getCollectionValues")
            assert status == 200 and json.loads(payload)
            status, zipped = request(port, "GET", f"{V4}/getImage?SeriesInstanceUID={uid}&IncludeMD5=yes")
            assert status == 200 and zipped[:2] == b"PK" and zipped[-22:-18] == b"PK\x05\x06"
        finally:
            for s in socks:
                s.close()
    figures.record("serve", case="slow and stalled clients", requests=92)


def test_a_stalled_half_request_is_closed_by_the_idle_timeout(small_archive, figures):
    """A connection that never completes its request is closed after the server's idle timeout
    (here 1 s), so stalled clients cannot pile up forever."""
    loop = asyncio.new_event_loop()
    started: Future[tuple[object, str]] = Future()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            started.set_result(loop.run_until_complete(start_server(small_archive, idle_timeout=1.0)))
        except BaseException as err:  # noqa: BLE001 - handed to the test's thread
            started.set_exception(err)
            return
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    runner, url = started.result(timeout=30)
    try:
        s = socket.create_connection(("127.0.0.1", port_of(url)), timeout=20)
        s.sendall(f"GET {V4}/getCollectionValues HTTP/1.1\r\nHost: x\r\n".encode())
        try:
            data = s.recv(100)  # blocks until the server closes (socket.timeout after 20 s fails the test)
        except ConnectionResetError:
            data = b""
        s.close()
        assert data == b"", data
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)  # type: ignore[attr-defined]
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
    figures.record("serve", case="stalled half request closed by the idle timeout", requests=1)


def test_harvest_of_a_served_harvest_skips_what_serve_refused(harvested, tmp_path):
    """The tampered series (symlink to a secret, ../ path) are not re-published; the rest harvest
    back byte-identical from the re-published DIR."""
    out, archive = harvested
    with serve_in_thread(archive) as srv:
        collections = sorted({r.row["Collection"] for r in archive.records()})
        result = harvest(srv.base_url, tmp_path / "copy", {"select": [{"collection": c} for c in collections]})
        assert result.ok, result.failed
        assert not any(SECRET in p.read_text(errors="replace") for p in (tmp_path / "copy").rglob("*") if p.is_file())
    assert len(manifest(tmp_path / "copy")["series"]) == len(archive)
