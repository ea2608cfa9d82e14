"""The DICOMweb client's requests under the same hostile answers as NBIA's (no Orthanc needed:
a loopback aiohttp server answers QIDO-RS): redirect loops and refused redirects, JSON nested
200,000 deep, a JSON answer past the cap, 2 MB headers and a bearer token echoed back each
raise one classified ``HarvesterError`` whose message holds no secret; an honest answer parses."""
from __future__ import annotations

import base64
from typing import Any

import anyio
import pytest
from aiohttp import web

from harvester.config import AuthConfig, Config
from harvester.errors import HarvesterError, PermanentRequestError, RetryableRequestError
from harvester.source.dicomweb import DICOMwebClient
from harvester.source.http import make_session

from .handserver import serve_app

BEARER = "dw-bearer-5c1e9a0b7d3f/secret+token"
PASSWORD = "dw-basic-pw&91f3/x"


def qido_app() -> web.Application:
    async def series(request: web.Request) -> web.StreamResponse:
        mode = request.query.get("mode", "")
        echoed = (f"denied {request.headers.get('Authorization')} {BEARER} {PASSWORD} "
                  f"{base64.b64encode(BEARER.encode()).decode()}")
        if mode == "loop":
            return web.Response(status=302, headers={"Location": str(request.rel_url)})
        if mode == "ftp":
            return web.Response(status=302, headers={"Location": "ftp://127.0.0.1/x"})
        if mode == "deep":
            return web.Response(body=b"[" * 200_000 + b"]" * 200_000, content_type="application/dicom+json")
        if mode == "big":
            return web.Response(body=b"[" + b'{"a": "' + b"x" * (3 << 20) + b'"}]', content_type="application/json")
        if mode == "headers":
            return web.Response(body=b"[]", headers={"X-Pad": "p" * (2 << 20)})
        if mode == "echo":
            return web.Response(status=403, text=echoed)
        if mode == "notjson":
            return web.Response(text=echoed, content_type="application/json")
        return web.json_response([{"0020000E": {"vr": "UI", "Value": ["1.2.3"]}}])

    app = web.Application()
    app.router.add_get("/dicom-web/series", series)
    return app


def search(root: str, mode: str, **config: Any) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        cfg = Config(api_url=f"{root}/dicom-web", source="dicomweb", retries=1, read_timeout=5,
                     max_json_bytes=1 << 20, **config)
        async with make_session(cfg) as session:
            client = DICOMwebClient(cfg, session)
            return await client.search("series", [("mode", mode)], key=lambda r: str(r))
    return anyio.run(go)


CASES = {"loop": (PermanentRequestError, "redirects in a loop"),
         "ftp": (PermanentRequestError, "ftp: URL, which is never followed"),
         "deep": (PermanentRequestError, "nested too deep"),
         "big": (PermanentRequestError, "more than 1048576 bytes of JSON"),
         "headers": (RetryableRequestError, "headers too long"),
         "echo": (PermanentRequestError, "HTTP 403"),
         "notjson": (RetryableRequestError, "not JSON")}


@pytest.mark.parametrize("auth", ["bearer", "basic"])
def test_dicomweb_requests_classify_every_hostile_answer(auth: str, figures) -> None:
    creds: dict[str, Any] = ({"bearer_token": BEARER} if auth == "bearer" else
                             {"auth": AuthConfig(token_url="", username="bob", password=PASSWORD)})
    # what this client knows (a bearer token, or the basic-auth password) and a server may echo
    secrets = ([BEARER, base64.b64encode(BEARER.encode()).decode().rstrip("=")] if auth == "bearer" else
               [PASSWORD, base64.b64encode(f"bob:{PASSWORD}".encode()).decode().rstrip("=")])
    with serve_app(qido_app()) as root:
        assert search(root, "honest", **creds)
        for mode, (kind, expect) in CASES.items():
            with pytest.raises(HarvesterError) as err:
                search(root, mode, **creds)
            line = err.value.one_line()
            assert isinstance(err.value, kind), (mode, type(err.value), line)
            assert expect in line and "\n" not in line, (mode, line)
            for secret in secrets:
                assert secret not in line, (mode, line)
    figures.record("issue14", family=f"exceptions: DICOMweb requests ({auth})", attacks=len(CASES),
                   outcome="one classified error each, no secret in it")
