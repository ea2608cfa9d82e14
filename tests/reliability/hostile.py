"""A hostile NBIA for the security and robustness families of issue 14: the hand server
(``handserver``) with a login endpoint and per-series or per-endpoint attacks.

``Hostile.attacks`` maps a SeriesInstanceUID (for getImage) or an endpoint name (any other GET)
to an aiohttp handler that answers in its own hostile way; everything else is the hand archive's
honest answer. ``attacks.clear()`` turns the server healthy again, for the rerun every test ends
with. The login endpoint issues ``TOKEN``; every request must carry it once ``require_auth``.

``cli`` runs ``python -X faulthandler -m harvester`` with the password in the environment;
``scan`` collects every byte written under DIR and printed, and asserts that no secret, in any
encoding ``secret_forms`` lists, and no traceback appears in any of them.
"""
from __future__ import annotations

import base64
import html
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import yaml
from aiohttp import web

from .handserver import HandArchive, dicom_series, honest_zip, make_hand_app, serve_app

COLLECTION = "HOSTILE"
USER = "alice"
PASSWORD = "pw-Tr0ub4dor&3/9f2c+x"       # '&', '/' and '+' make its encodings differ from it
TOKEN = "tok-5e1f0a77c2b94d0f8e6a/secret+bearer"
REFRESH = "refresh-91c3d5e7f9a1b3c5d7e9"

Attack = Callable[[web.Request], Awaitable[web.StreamResponse]]


def secret_forms(*secrets: str) -> list[str]:
    """Each secret as a server could echo it: literal, URL-encoded, JSON-escaped (``/`` as
    ``\\/``, as NBIA writes it), as XML/HTML text, base64 (and the basic-auth pair of the user
    and the password)."""
    forms: set[str] = set()
    for s in secrets:
        forms |= {s, quote(s, safe=""), quote_plus(s), base64.b64encode(s.encode()).decode().rstrip("="),
                  json.dumps(s)[1:-1].replace("/", "\\/"), html.escape(s)}
    forms.add(base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode().rstrip("="))
    return sorted(forms)


SECRETS = secret_forms(PASSWORD, TOKEN, REFRESH)


@dataclass
class Hostile:
    archive: HandArchive
    uids: list[str]
    attacks: dict[str, Attack] = field(default_factory=dict)
    require_auth: bool = False
    hits: dict[str, int] = field(default_factory=dict)     # attack key -> times it answered
    sent: dict[str, int] = field(default_factory=dict)     # attack key -> body bytes it sent
    base_url: str = ""

    def query_file(self, tmp: Path) -> Path:
        path = tmp / "q.yaml"
        path.write_text(yaml.safe_dump({"select": [{"collection": COLLECTION}]}))
        return path


def build_hostile(n: int = 3, *, seed: str = "hostile") -> Hostile:
    """An archive of ``n`` honest series of 3 small DICOM files each."""
    archive = HandArchive(collections=[COLLECTION])
    rows, uids = [], []
    for i in range(n):
        uid = f"1.2.826.0.1.3680043.2.1125.14{i:03d}"
        files = dicom_series(uid, seed=f"{seed}-{i}", pixels=256)
        size = sum(len(d) for _, d in files)
        rows.append({"SeriesInstanceUID": uid, "StudyInstanceUID": "1.2.826.0.1.3680043.2.1125.14", "Collection":
                     COLLECTION, "PatientID": "H-0001", "Modality": "CT", "SeriesNumber": i + 1,
                     "SeriesDescription": f"series {i}", "ImageCount": len(files), "FileSize": size})
        archive.zips[uid] = honest_zip(files)
        archive.sizes[uid] = [{"TotalSizeInBytes": size, "ObjectCount": len(files)}]
        uids.append(uid)
    archive.series = rows
    return Hostile(archive, uids)


def make_hostile_app(h: Hostile) -> web.Application:
    app = make_hand_app(h.archive)

    @web.middleware
    async def hostile(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.endswith("/oauth/token"):
            return await handler(request)
        if h.require_auth and request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.Response(status=401, text="login first")
        name = request.match_info.get("endpoint", "")
        key = request.query.get("SeriesInstanceUID", "") if name in ("getImage", "getImageWithMD5Hash") else name
        attack = h.attacks.get(key) or (h.attacks.get(name) if name not in ("getImage", "getImageWithMD5Hash") else None)
        if attack is None:
            return await handler(request)
        h.hits[key] = h.hits.get(key, 0) + 1
        return await attack(request)

    async def token(request: web.Request) -> web.StreamResponse:
        await request.post()
        if "token" in h.attacks:
            h.hits["token"] = h.hits.get("token", 0) + 1
            return await h.attacks["token"](request)
        return web.json_response({"access_token": TOKEN, "refresh_token": REFRESH, "expires_in": 3600,
                                  "token_type": "bearer"})

    app.middlewares.append(hostile)
    app.router.add_post("/nbia-api/oauth/token", token)
    return app


@contextmanager
def serve_hostile(h: Hostile) -> Iterator[str]:
    with serve_app(make_hostile_app(h)) as root:
        h.base_url = f"{root}/nbia-api/services/v4"
        yield h.base_url


async def stream(request: web.Request, chunks: Any, *, headers: dict[str, str] | None = None,
                 h: Hostile | None = None, key: str = "", status: int = 200) -> web.StreamResponse:
    """Send ``chunks`` (bytes, or awaitables' results) as a chunked body; counts what went out.
    A client that hangs up ends the stream quietly."""
    resp = web.StreamResponse(status=status, headers={"Content-Type": "application/octet-stream", **(headers or {})})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    try:
        async for chunk in chunks:
            await resp.write(chunk)
            if h is not None:
                h.sent[key] = h.sent.get(key, 0) + len(chunk)
        await resp.write_eof()
    except (ConnectionError, RuntimeError):
        pass
    return resp


ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "NBIA_PW": PASSWORD}


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-X", "faulthandler", "-m", "harvester", *args], capture_output=True,
                          text=True, env=ENV, timeout=timeout, stdin=subprocess.DEVNULL)


#: small bounds so that no attack holds a test for more than a few seconds
FAST = ["--retries", "2", "--series-retries", "1", "--timeout", "5", "--no-progress"]
AUTH = ["--user", USER, "--password-env", "NBIA_PW"]


def run_args(h: Hostile, tmp: Path, out: Path, *extra: str) -> list[str]:
    return ["run", str(h.query_file(tmp)), "-o", str(out), "--api-url", h.base_url, *FAST, *extra]


def texts(out: Path, *procs: subprocess.CompletedProcess[str]) -> dict[str, str]:
    found = {f"{' '.join(p.args[4:5])}#{i}:{name}": getattr(p, name)
             for i, p in enumerate(procs) for name in ("stdout", "stderr")}
    if out.exists():
        for path in out.rglob("*"):
            if path.is_file():
                found[str(path.relative_to(out))] = path.read_bytes().decode("utf-8", "replace")
    return found


def scan(out: Path, *procs: subprocess.CompletedProcess[str], secrets: list[str] = SECRETS) -> int:
    """No traceback printed, no secret in any form anywhere; returns how many texts were scanned."""
    found = texts(out, *procs)
    for where, text in found.items():
        assert "Traceback" not in text, f"{where}: {text[-2000:]}"
        for secret in secrets:
            assert secret not in text, f"a secret ({secret[:6]}...) leaked into {where}"
    return len(found)


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("harvester: error: ")]


def failed_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith("  failed: ")]


def statuses(out: Path) -> dict[str, str]:
    import json
    doc = json.loads((out / "harvest.json").read_text("utf-8"))
    return {r["SeriesInstanceUID"]: r["status"] for r in doc["series"]}


def assert_rerun_completes(h: Hostile, tmp: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """The attacks stop; the same command completes every series (nothing harvested was lost)."""
    h.attacks.clear()
    proc = cli(*run_args(h, tmp, out, *extra))
    assert proc.returncode == 0, (proc.stdout[-1500:], proc.stderr[-1500:])
    assert set(statuses(out).values()) == {"complete"} and len(statuses(out)) == len(h.uids)
    assert not list((out / ".harvester" / "tmp").iterdir())
    return proc
