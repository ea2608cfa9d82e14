"""The one request path of every source (``harvester.source.http.request``): auth as a strategy,
a 401 answered once with a refreshed token, and every failure classified, those of the request
sent after the refresh included. Real loopback servers, no mocks."""
from __future__ import annotations

from typing import Any

import anyio
import pytest
from aiohttp import web

from harvester.config import AuthConfig, Config
from harvester.errors import AuthError, HarvesterError, RetryableRequestError
from harvester.source.dicomweb import DICOMwebClient
from harvester.source.http import make_session
from harvester.source.nbia import NBIAClient
from reliability.handserver import serve_app

PASSWORD = "pw-7d1c/secret&x"
TOKENS = ["tok-first-0a9c1f", "tok-second-77e2b4"]


def app_401_then(after: str, seen: list[str]) -> web.Application:
    """getSeries answers 401 to the first token, then ``after``: ``reset`` (the connection is
    dropped before any answer), ``401`` (refused again) or ``ok``; ``token-reset``: the token
    endpoint drops the connection of the refresh."""
    issued = iter(TOKENS)

    async def token(request: web.Request) -> web.Response:
        value = next(issued)
        if value == TOKENS[1] and after == "token-reset":
            assert request.transport is not None
            request.transport.abort()
        return web.json_response({"access_token": value, "expires_in": 3600})

    async def series(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization", ""))
        if len(seen) == 1 or after == "401":
            return web.Response(status=401, text=f"bad token {request.headers.get('Authorization')}")
        if after == "reset":
            assert request.transport is not None
            request.transport.abort()   # the connection is gone before any answer
            return web.Response(status=200)
        return web.json_response([{"SeriesInstanceUID": "1.2.3"}])

    app = web.Application()
    app.router.add_post("/oauth/token", token)
    app.router.add_get("/v4/getSeries", series)
    app.router.add_get("/dw/series", series)
    return app


def nbia_query(root: str, retries: int = 1) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        cfg = Config(api_url=f"{root}/v4", retries=retries, read_timeout=5, backoff_base=0.01, backoff_max=0.02,
                     auth=AuthConfig(token_url=f"{root}/oauth/token", username="ann", password=PASSWORD))
        async with make_session(cfg) as session:
            return await NBIAClient(cfg, session).query("getSeries", {"Collection": "X"})
    return anyio.run(go)


def test_a_reset_on_the_request_after_a_token_refresh_is_classified() -> None:
    """The bug of issue 15: 401, the token is refreshed, and the request sent again meets a
    reset connection. That is a retryable request error (classified, one line, no secret),
    never an aiohttp exception."""
    seen: list[str] = []
    with serve_app(app_401_then("reset", seen)) as root:
        with pytest.raises(HarvesterError) as info:
            nbia_query(root)
    assert isinstance(info.value, RetryableRequestError), type(info.value)
    assert seen[:2] == [f"Bearer {TOKENS[0]}", f"Bearer {TOKENS[1]}"], "the refreshed token was sent"
    message = str(info.value)
    assert "\n" not in message and "getSeries" in message
    for secret in (PASSWORD, *TOKENS):
        assert secret not in message


def test_a_reset_of_the_token_refresh_itself_is_classified() -> None:
    seen: list[str] = []
    with serve_app(app_401_then("token-reset", seen)) as root:
        with pytest.raises(HarvesterError) as info:
            nbia_query(root)
    assert isinstance(info.value, RetryableRequestError), type(info.value)
    assert "token" in str(info.value)
    for secret in (PASSWORD, *TOKENS):
        assert secret not in str(info.value)


def test_a_second_401_after_the_refresh_is_an_auth_error() -> None:
    seen: list[str] = []
    with serve_app(app_401_then("401", seen)) as root:
        with pytest.raises(AuthError, match="rejected the credentials") as info:
            nbia_query(root)
    assert len(seen) == 2
    assert TOKENS[1] not in str(info.value)


def test_the_refreshed_token_gets_the_answer() -> None:
    seen: list[str] = []
    with serve_app(app_401_then("ok", seen)) as root:
        assert nbia_query(root) == [{"SeriesInstanceUID": "1.2.3"}]
    assert seen == [f"Bearer {TOKENS[0]}", f"Bearer {TOKENS[1]}"]


def test_dicomweb_basic_auth_refused_is_an_auth_error_at_once() -> None:
    """Fixed credentials cannot be refreshed: one 401 is the answer, asked once."""
    seen: list[str] = []
    with serve_app(app_401_then("ok", seen)) as root:
        async def go() -> None:
            cfg = Config(api_url=f"{root}/dw", source="dicomweb", retries=3, read_timeout=5,
                         auth=AuthConfig(token_url="", username="ann", password=PASSWORD))
            async with make_session(cfg) as session:
                await DICOMwebClient(cfg, session).search("series", [], key=str)
        with pytest.raises(AuthError) as info:
            anyio.run(go)
    assert len(seen) == 1
    assert PASSWORD not in str(info.value)


def app_proxy(seen: list[tuple[str, str, str]]) -> web.Application:
    """An HTTP proxy that answers for any archive itself: records (method, absolute target,
    Proxy-Authorization) of each request it is sent."""

    async def any_request(request: web.Request) -> web.Response:
        seen.append((request.method, str(request.url), request.headers.get("Proxy-Authorization", "")))
        if request.path.endswith("/oauth/token"):
            return web.json_response({"access_token": TOKENS[0], "expires_in": 3600})
        return web.json_response([{"SeriesInstanceUID": "1.2.3"}])

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_request)
    return app


def _clear_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                 "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)


def _netrc_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Any, entry: str) -> None:
    """No proxy variables, and a ~/.netrc (``NETRC``) holding ``entry`` alone."""
    _clear_proxy_env(monkeypatch)
    netrc = tmp_path / "netrc"
    netrc.write_text(entry + "\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))


def test_proxies_from_the_environment_are_honoured_and_looked_up_once_per_host(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """The session no longer trusts the environment per request (two thread hops each): the
    proxy variables are read once per host, and every request, the token's POST included, still
    goes through the proxy they name (with its credentials from ~/.netrc, as aiohttp's own)."""
    import harvester.source.http as http

    _netrc_only(monkeypatch, tmp_path, "machine 127.0.0.1 login pat password proxy-pw-31")
    lookups: list[str] = []
    real = http.get_env_proxy_for_url
    monkeypatch.setattr(http, "get_env_proxy_for_url", lambda url: (lookups.append(str(url)), real(url))[1])
    seen: list[tuple[str, str, str]] = []
    with serve_app(app_proxy(seen)) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy)

        async def go() -> list[Any]:
            cfg = Config(api_url="http://archive.invalid/v4", retries=1, read_timeout=5,
                         auth=AuthConfig(token_url="http://login.invalid/oauth/token", username="ann",
                                         password=PASSWORD))
            async with make_session(cfg) as session:
                assert not session.trust_env
                client = NBIAClient(cfg, session)
                return [await client.query("getSeries", {"Collection": c}) for c in ("X", "Y", "Z")]
        assert anyio.run(go) == [[{"SeriesInstanceUID": "1.2.3"}]] * 3
    assert [(m, url.split("?")[0]) for m, url, _ in seen] == [
        ("POST", "http://login.invalid/oauth/token")] + [("GET", "http://archive.invalid/v4/getSeries")] * 3
    assert all(auth.startswith("Basic ") for _, _, auth in seen), "the proxy's netrc credentials were sent"
    assert len(lookups) == 2, lookups   # one per host (the token's and the archive's), not one per request


def test_no_proxy_and_a_netrc_entry_for_the_archive_do_not_get_in_the_way(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """NO_PROXY still sends a host's requests directly. ~/.netrc is not read for the archive's
    own credentials: with aiohttp's trust_env, a netrc entry for the API host made every request
    that carried a token fail (aiohttp refuses an Authorization header beside netrc's)."""
    _netrc_only(monkeypatch, tmp_path, "machine 127.0.0.1 login ann password netrc-pw-58")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    seen: list[str] = []
    with serve_app(app_401_then("ok", seen)) as root:
        assert nbia_query(root) == [{"SeriesInstanceUID": "1.2.3"}]
    assert seen == [f"Bearer {TOKENS[0]}", f"Bearer {TOKENS[1]}"]


def test_the_proxys_netrc_password_is_a_secret_the_redactor_knows(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Any) -> None:
    """The proxy's credentials now travel in its URL (aiohttp 3.14 deprecates ``proxy_auth``), so
    any error that shows that URL must not show the password: it is registered with the redactor
    as soon as it is looked up."""
    import harvester.source.http as http
    from harvester.redact import redact

    _netrc_only(monkeypatch, tmp_path, "machine 127.0.0.1 login pat password proxy-pw-77")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")

    async def go() -> dict[str, Any]:
        async with make_session(Config(api_url="http://archive.invalid/v4")) as session:
            return http.env_proxy(session, "http://archive.invalid/v4/getSeries")
    kwargs = anyio.run(go)
    assert set(kwargs) == {"proxy"}
    assert kwargs["proxy"].password == "proxy-pw-77"
    assert "proxy-pw-77" not in redact(f"cannot connect to {kwargs['proxy']}")
    assert "proxy-pw-77" not in redact("the proxy answered: bad password proxy-pw-77")   # alone, not in a URL
