"""The NBIA client over real HTTP: parameters, parsing, retries, auth, and secrets staying secret."""
from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import sys
from pathlib import Path

import anyio
import pytest
import yaml
from aiohttp import web

from harvest_helpers import harvest, normal_collections, normal_series, select_all, test_config
from harvester.config import AuthConfig
from harvester.errors import AuthError, PermanentRequestError, RetryableRequestError, UsageError
from harvester.server.app import TOKENS_KEY
from harvester.server.auth import ServerAuth
from harvester.server.testing import serve_in_thread
from harvester.source.nbia import NBIAClient, as_int, make_session, parse_retry_after, redact_url

PASSWORD = "correct-horse-battery-staple-42"


async def _with_client(config, fn):
    async with make_session(config) as session:
        return await fn(NBIAClient(config, session))


def run_client(server_url, tmp_path, fn, **overrides):
    config = test_config(server_url, tmp_path / "o", **overrides)
    return anyio.run(_with_client, config, fn)


def test_parsers():
    assert as_int("1234.0") == 1234 and as_int(7) == 7 and as_int("x") is None and as_int(None) is None
    assert as_int(-1) is None and as_int(True) is None
    # numbers as v4 sends them, and as strings the way deployments and proxies pass them on
    assert as_int(1234) == as_int("1234") == as_int("1234.0") == as_int(1234.0) == as_int(" 1234 ") == 1234
    assert as_int("1.2E7") == as_int(1.2e7) == 12_000_000 and as_int("3000566.000000") == 3000566
    assert as_int("NaN") is None and as_int("Infinity") is None and as_int("") is None
    # an int is taken as it is (a size of 9 PB is not rounded through a float), up to the bound
    assert as_int(2**53 + 1) == 2**53 + 1 and as_int(2**62) == 2**62 and as_int(2**62 + 1) is None
    assert parse_retry_after("3") == 3.0 and parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert redact_url("https://u:pw@h.org/x?password=p&a=1") == "https://h.org/x?password=***&a=1"


def test_unknown_parameter_is_refused_before_sending(server, tmp_path):
    async def go(client):
        with pytest.raises(UsageError) as err:
            await client.query("getSeries", {"collection": "X"})
        assert "collection" in str(err.value)
        return client.requests

    assert run_client(server.base_url, tmp_path, go) == 0
    assert sum(server.stats.requests.values()) == 0


def test_queries_and_series_size(server, small_archive, tmp_path):
    name = normal_collections(small_archive)[0]

    async def go(client):
        cols = await client.collections()
        rows = await client.query("getSeries", {"Collection": name})
        uid = rows[0]["SeriesInstanceUID"]
        return cols, rows, await client.series_size(uid), uid

    cols, rows, (count, size), uid = run_client(server.base_url, tmp_path, go)
    assert name in cols
    rec = small_archive.get(uid)
    assert count == len(rec.instances) and size == sum(i.size for i in rec.instances)
    assert {r["SeriesInstanceUID"] for r in rows} == {r.uid for r in small_archive.records()
                                                     if r.row["Collection"] == name}


@pytest.mark.parametrize("as_strings", [False, True])
def test_series_size_with_numbers_or_strings(small_archive, tmp_path, as_strings):
    rec = small_archive.get(normal_series(small_archive)[0])

    async def go(client):
        return await client.query("getSeriesSize", {"SeriesInstanceUID": rec.uid}), await client.series_size(rec.uid)

    with serve_in_thread(small_archive, numbers_as_strings=as_strings) as srv:
        rows, sizes = run_client(srv.base_url, tmp_path, go)
    assert isinstance(rows[0]["TotalSizeInBytes"], str) == as_strings  # the wire form differs...
    assert sizes == (len(rec.instances), rec.total_bytes)  # ...the reading does not


def test_no_match_empty_body_is_no_rows(server, tmp_path):
    async def go(client):
        return (await client.query("getSeries", {"Collection": "NO-SUCH"}),
                await client.query("getSeriesSize", {"SeriesInstanceUID": "1.2.3.404"}),
                await client.series_size("1.2.3.404"), client.requests, client.retries)

    series, size, (count, total), requests, retries = run_client(server.base_url, tmp_path, go)
    assert series == [] and size == [] and (count, total) == (None, None)
    assert (requests, retries) == (3, 0)  # answered at once, not retried as a bad body
    assert server.stats.requests == {"getSeries": 1, "getSeriesSize": 2}


@pytest.fixture
def odd_bodies():
    """A loopback server that answers getSeries with whitespace, getSeriesSize with JSON null,
    getPatient with an HTML page typed 200 (what a proxy in front of NBIA sometimes does)."""
    bodies = {"getSeries": b" \r\n\t ", "getSeriesSize": b"null", "getPatient": b"<html>down</html>"}

    async def handler(request):
        return web.Response(body=bodies[request.match_info["endpoint"]], content_type="application/json")

    async def start():
        app = web.Application()
        app.router.add_get("/nbia-api/services/v4/{endpoint}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner

    loop = asyncio.new_event_loop()
    runner = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/nbia-api/services/v4"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_whitespace_and_null_bodies_are_no_rows(odd_bodies, tmp_path):
    async def go(client):
        rows = (await client.query("getSeries"), await client.query("getSeriesSize", {"SeriesInstanceUID": "1.2"}))
        with pytest.raises(RetryableRequestError, match="not JSON"):
            await client.query("getPatient")  # still an error: not data, not an empty answer
        return rows

    assert run_client(odd_bodies, tmp_path, go, retries=1) == ([], [])


def test_server_400_text_is_reported(server, tmp_path):
    async def go(client):
        with pytest.raises(PermanentRequestError) as err:
            await client.query("getUpdatedSeries", {"fromDate": "2020-01-01"})  # v4 wants MM-DD-YYYY
        return err.value

    err = run_client(server.base_url, tmp_path, go)
    assert err.status == 400 and "HTTP 400" in str(err)


def _auth_config(base_url: str, password: str) -> AuthConfig:
    root = base_url.split("/nbia-api/")[0]
    return AuthConfig(token_url=f"{root}/nbia-api/oauth/token", username="alice", password=password)


def test_bearer_auth_refreshes_after_expiry(small_archive, tmp_path):
    now = [1000.0]
    auth = ServerAuth(users={"alice": PASSWORD}, expires_in=3600, clock=lambda: now[0])
    with serve_in_thread(small_archive, auth=auth) as srv:
        async def go(client):
            first = await client.collections()
            now[0] += 7200  # the server now considers the token expired: one 401, refresh, retry
            second = await client.collections()
            return first, second

        first, second = run_client(srv.base_url, tmp_path, go, auth=_auth_config(srv.base_url, PASSWORD))
        assert first == second and first


def test_wrong_password_is_fatal_auth_error(small_archive, tmp_path):
    auth = ServerAuth(users={"alice": PASSWORD})
    with serve_in_thread(small_archive, auth=auth) as srv:
        async def go(client):
            with pytest.raises(AuthError) as err:
                await client.collections()
            return err.value

        err = run_client(srv.base_url, tmp_path, go, auth=_auth_config(srv.base_url, "wrong"))
        assert "wrong" not in str(err) and PASSWORD not in str(err)


def test_no_credentials_against_protected_server_is_auth_error(small_archive, tmp_path):
    with serve_in_thread(small_archive, auth=ServerAuth(users={"alice": PASSWORD})) as srv:
        async def go(client):
            with pytest.raises(AuthError):
                await client.collections()

        run_client(srv.base_url, tmp_path, go)


def test_secrets_never_written_or_printed(small_archive, tmp_path):
    """An authenticated harvest through the CLI: neither the password nor any token issued
    appears in stdout, stderr, or any file written under the output directory."""
    with serve_in_thread(small_archive, auth=ServerAuth(users={"alice": PASSWORD}),
                         faults="error=0.2,seed=3") as srv:
        q = tmp_path / "q.yaml"
        q.write_text(yaml.safe_dump(select_all(small_archive)))
        out = tmp_path / "out"
        env = {**os.environ, "NBIA_PW": PASSWORD}
        proc = subprocess.run(
            [sys.executable, "-m", "harvester", "run", str(q), "-o", str(out), "--api-url", srv.base_url,
             "--user", "alice", "--password-env", "NBIA_PW", "--timeout", "2", "--no-progress"],
            capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        issuer = srv.app[TOKENS_KEY]
        tokens = list(issuer._access) + list(issuer._refresh)
        assert tokens, "the server issued no token: the test would prove nothing"
        secrets = [PASSWORD, *tokens]
        texts = [proc.stdout, proc.stderr]
        texts += [p.read_bytes().decode("utf-8", "replace") for p in out.rglob("*") if p.is_file()]
        for text in texts:
            for secret in secrets:
                assert secret not in text
        # the wrong password: the error names the problem, not the secret
        env["NBIA_PW"] = "not-the-" + PASSWORD
        proc = subprocess.run(
            [sys.executable, "-m", "harvester", "run", str(q), "-o", str(tmp_path / "o2"), "--api-url", srv.base_url,
             "--user", "alice", "--password-env", "NBIA_PW", "--no-progress"],
            capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 3, (proc.returncode, proc.stderr)
        assert PASSWORD not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    assert len(normal_series(small_archive)) > 0


def test_harvest_with_auth_completes(small_archive, tmp_path):
    with serve_in_thread(small_archive, auth=ServerAuth(users={"alice": PASSWORD})) as srv:
        result = harvest(srv.base_url, tmp_path / "out", select_all(small_archive),
                         auth=_auth_config(srv.base_url, PASSWORD))
        assert result.ok, result.failed
    assert Path(tmp_path / "out" / "harvest.json").exists()


def test_nlst_is_routed_to_its_host_only_with_the_public_default():
    from harvester.config import DEFAULT_API_URL, NLST_API_URL, Config

    public = NBIAClient(Config(), session=None)  # routing needs no network
    assert public.base_for("NLST") == NLST_API_URL
    assert public.base_for("LIDC-IDRI") == DEFAULT_API_URL
    assert public.series_url("1.2.3", "NLST").startswith(NLST_API_URL + "/getImage?")
    assert "SeriesInstanceUID=1.2.3" in public.series_url("1.2.3", "NLST")
    private = NBIAClient(Config(api_url="http://127.0.0.1:1/nbia-api/services/v4"), session=None)
    assert private.base_for("NLST") == "http://127.0.0.1:1/nbia-api/services/v4"


def test_instance_md5_speaks_each_version_as_nbia_tcia_reads_it(server, small_archive, tmp_path):
    """v4 allows only SOPInstanceUID and answers empty (its handler reads SOPInstanceUid): asked
    once, then never again this run; v2 reads SOPInstanceUid and gives the MD5."""
    rec = small_archive.get(normal_series(small_archive)[0])
    sops = [i.sop_uid for i in rec.instances]

    async def ask_all(client):
        return [await client.instance_md5(sop, None) for sop in sops]

    server.stats.reset()
    assert run_client(server.base_url, tmp_path, ask_all) == [""] * len(sops)
    assert server.stats.requests.get("getMD5HashForImage") == 1
    v2 = server.base_url.rsplit("/", 1)[0] + "/v2"
    assert run_client(v2, tmp_path, ask_all) == [i.md5 for i in rec.instances]
