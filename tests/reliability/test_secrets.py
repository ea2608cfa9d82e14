"""Secrets stay secret: the password, every token the server issued, and a password in the URL
never appear in stdout, stderr, the journal, harvest.json, metadata.csv, the HTML report, the
output of status/verify/query, or any error text, including when the token endpoint fails or
echoes secrets back, and when the server rejects the refresh (tests/source/nbia/test_client.py covers
the plain authenticated harvest)."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from harvest_helpers import normal_series, select_all
from harvester.server.app import STATS_KEY, TOKENS_KEY
from harvester.server.archive import Archive
from harvester.server.auth import ServerAuth, TokenGrantError
from harvester.server.synthetic import SyntheticSpec, build_synthetic
from harvester.server.testing import ServerHandle, serve_in_thread

from .handserver import serve_app

SPEC = "collections=1,patients=2,studies=1,series=3,instances=2,size=2KiB,seed=67"
PASSWORD = "Tr0ub4dor&3-secret-pw-51c2"
URL_PASSWORD = "url-userinfo-secret-9d41"


@pytest.fixture(scope="module")
def archive(synthetic_cache: Path) -> Archive:
    return build_synthetic(SyntheticSpec.parse(SPEC), synthetic_cache)


class Recorder:
    """Wraps the server's token issuer: records every secret it hands out, and can refuse grants."""

    def __init__(self, srv: ServerHandle, *, refuse_refresh: bool = False, password_grants: int | None = None) -> None:
        self.issuer = srv.app[TOKENS_KEY]
        self.secrets: list[str] = []
        self.grants: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        real_issue, real_grant = self.issuer._issue, self.issuer.grant

        def issue(user: str) -> dict[str, Any]:
            body = real_issue(user)
            self.secrets += [body["access_token"], body["refresh_token"], body["session_state"]]
            return body

        def grant(form: Any) -> dict[str, Any]:
            kind = form.get("grant_type", "")
            self.grants[kind] += 1
            if kind == "refresh_token" and refuse_refresh:
                self.refused[kind] += 1  # and a careless server echoes the secret back
                raise TokenGrantError(401, "invalid_grant", f"refresh token {form.get('refresh_token')} revoked")
            if kind == "password" and password_grants is not None and self.grants[kind] > password_grants:
                self.refused[kind] += 1
                raise TokenGrantError(401, "invalid_grant", f"password {form.get('password')} is no longer valid")
            return real_grant(form)

        self.issuer._issue = issue  # type: ignore[method-assign]
        self.issuer.grant = grant   # type: ignore[method-assign]


def cli(*args: str, password: str = PASSWORD) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NBIA_PW": password, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "harvester", *args], capture_output=True, text=True, env=env,
                          timeout=300, stdin=subprocess.DEVNULL)


def auth_flags(*extra: str) -> list[str]:
    return ["--user", "alice", "--password-env", "NBIA_PW", "--timeout", "5", "--no-progress", *extra]


def texts_of(out: Path, *procs: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """Everything a secret could leak into: every file under DIR (the state database's rows
    inflated, harvest.json, metadata.csv, licenses, report.html...) and every process output."""
    texts = {f"{p.args[3] if len(p.args) > 3 else p.args}:{name}": getattr(p, name)
             for p in procs for name in ("stdout", "stderr")}
    if out.exists():
        for path in out.rglob("*"):
            if path.is_file():
                texts[str(path.relative_to(out))] = path.read_bytes().decode("utf-8", "replace")
        db = out / ".harvester" / "state.db"
        if db.is_file():   # its records are stored compressed: read every value as the harvester would
            texts["state.db rows"] = state_db_text(db)
    return texts


def state_db_text(db: Path) -> str:
    """Every value of every table of a state database, zlib-compressed ones inflated."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        values = []
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                for value in row:
                    if isinstance(value, bytes):
                        try:
                            value = zlib.decompress(value)
                        except zlib.error:
                            pass
                        value = value.decode("utf-8", "replace")
                    values.append(str(value))
        return "\n".join(values)
    finally:
        conn.close()


def assert_no_secret(texts: dict[str, str], secrets: list[str]) -> int:
    assert secrets and all(len(s) >= 8 for s in secrets)
    for where, text in texts.items():
        assert "Traceback" not in text, where
        for secret in secrets:
            assert secret not in text, f"a secret leaked into {where}"
    return len(texts)


def one_error_line(proc: subprocess.CompletedProcess[str], code: int = 3) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout[-1500:], proc.stderr[-1500:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("harvester: error: "), proc.stderr
    return lines[0]


@pytest.fixture
def query(tmp_path: Path, archive: Archive) -> Path:
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(select_all(archive)))
    return path


def follow_up_commands(out: Path, base_url: str) -> list[subprocess.CompletedProcess[str]]:
    """status, verify, report and an authenticated query: their outputs are scanned too."""
    procs = [cli("status", str(out), "--json"), cli("verify", str(out)), cli("report", str(out)),
             cli("query", "getCollectionValues", "--api-url", base_url, "--format", "json", *auth_flags()[:4])]
    for p in procs:
        assert p.returncode == 0, (p.args, p.stderr[-800:])
    return procs


@pytest.mark.slow
def test_refreshing_harvest_with_faults_leaks_nothing(archive, tmp_path, query, figures):
    """Tokens that last 30 s: the client refreshes before every request; faults make it retry."""
    auth = ServerAuth(users={"alice": PASSWORD}, expires_in=30)
    with serve_in_thread(archive, auth=auth, faults="error=0.2,reset=0.1,truncate=0.2,seed=4") as srv:
        rec = Recorder(srv)
        out = tmp_path / "out"
        proc = cli("run", str(query), "-o", str(out), "--api-url", srv.base_url, *auth_flags())
        assert proc.returncode == 0, proc.stderr[-1500:]
        procs = [proc, *follow_up_commands(out, srv.base_url)]
        faults = srv.app[STATS_KEY].faults
    assert rec.grants["refresh_token"] >= 3 and rec.grants["password"] >= 1, rec.grants
    assert sum(faults.values()) > 0
    assert (out / ".harvester" / "state.db").exists() and (out / "report.html").exists()
    scanned = assert_no_secret(texts_of(out, *procs), [PASSWORD, *rec.secrets])
    figures.record("secrets", case="refresh before every request, with faults", texts=scanned,
                   secrets=1 + len(rec.secrets), grants=dict(rec.grants), series=len(normal_series(archive)))


@pytest.mark.slow
def test_rejected_refresh_falls_back_to_the_password_and_leaks_nothing(archive, tmp_path, query, figures):
    auth = ServerAuth(users={"alice": PASSWORD}, expires_in=30)
    with serve_in_thread(archive, auth=auth) as srv:
        rec = Recorder(srv, refuse_refresh=True)
        out = tmp_path / "out"
        proc = cli("run", str(query), "-o", str(out), "--api-url", srv.base_url, *auth_flags())
        assert proc.returncode == 0, proc.stderr[-1500:]
        procs = [proc, *follow_up_commands(out, srv.base_url)]
    assert rec.refused["refresh_token"] >= 1 and rec.grants["password"] >= 2, rec.grants
    scanned = assert_no_secret(texts_of(out, *procs), [PASSWORD, *rec.secrets])
    figures.record("secrets", case="server rejects the refresh (echoing the token)", texts=scanned,
                   secrets=1 + len(rec.secrets), grants=dict(rec.grants))


def test_password_rejected_mid_run_is_exit_3_and_leaks_nothing(archive, tmp_path, query, figures):
    auth = ServerAuth(users={"alice": PASSWORD}, expires_in=30)
    with serve_in_thread(archive, auth=auth) as srv:
        rec = Recorder(srv, refuse_refresh=True, password_grants=2)
        out = tmp_path / "out"
        proc = cli("run", str(query), "-o", str(out), "--api-url", srv.base_url, *auth_flags(), "--quiet")
        line = one_error_line(proc)
    assert "rejected" in line and rec.refused["password"] >= 1
    scanned = assert_no_secret(texts_of(out, proc), [PASSWORD, *rec.secrets])
    figures.record("secrets", case="password rejected mid-run (echoed by the server)", texts=scanned,
                   secrets=1 + len(rec.secrets))


def token_app(behaviour: str) -> web.Application:
    """A token endpoint that fails in one way; every body echoes the posted password."""
    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        pw = str(form.get("password", ""))
        if behaviour == "500-html":
            return web.Response(status=500, text=f"<html><body>Internal error for password={pw}</body></html>",
                                content_type="text/html")
        if behaviour == "200-html":
            return web.Response(text=f"<html>login page for {pw}</html>", content_type="text/html")
        if behaviour == "200-no-token":
            return web.json_response({"error": "server_error", "error_description": f"no token for {pw}"})
        if behaviour == "200-token-not-a-string":
            return web.json_response({"access_token": {"value": pw}, "expires_in": "soon"})
        if behaviour == "401-echo":
            return web.json_response({"error": "invalid_grant", "error_description": f"bad password {pw}"}, status=401)
        if behaviour == "302-redirect":
            raise web.HTTPFound(f"/login?password={pw}")
        raise AssertionError(behaviour)

    async def login(request: web.Request) -> web.Response:
        return web.Response(text=f"login page for {request.query.get('password')}", content_type="text/html")

    app = web.Application()
    app.router.add_post("/token", token)
    app.router.add_get("/login", login)
    return app


TOKEN_FAILURES = ["500-html", "200-html", "200-no-token", "200-token-not-a-string", "401-echo", "302-redirect"]


@pytest.mark.parametrize("behaviour", TOKEN_FAILURES)
def test_failing_token_endpoint_is_one_line_exit_3_and_leaks_nothing(archive, tmp_path, query, behaviour, figures):
    with serve_in_thread(archive, auth=ServerAuth(users={"alice": PASSWORD})) as srv, \
            serve_app(token_app(behaviour)) as token_root:
        out = tmp_path / "out"
        proc = cli("run", str(query), "-o", str(out), "--api-url", srv.base_url,
                   *auth_flags("--token-url", f"{token_root}/token", "--retries", "2", "--quiet"))
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        line = one_error_line(proc)
        assert "token" in line, line
        assert sum(srv.stats.downloads.values()) == 0
    scanned = assert_no_secret(texts_of(out, proc), [PASSWORD])
    figures.record("secrets", case=f"token endpoint fails: {behaviour}", texts=scanned, secrets=1, message=line)


def test_password_in_the_url_is_never_written(archive, tmp_path, query, figures):
    with serve_in_thread(archive) as srv:
        url = srv.base_url.replace("http://", f"http://alice:{URL_PASSWORD}@")
        out = tmp_path / "out"
        proc = cli("run", str(query), "-o", str(out), "--api-url", url, "--no-progress", "--timeout", "5")
        assert proc.returncode == 0, proc.stderr[-1500:]
        unreachable = f"http://alice:{URL_PASSWORD}@127.0.0.1:9/nbia-api/services/v4"  # error texts name the URL
        failing = cli("run", str(query), "-o", str(tmp_path / "o2"), "--api-url", unreachable, "--retries", "1",
                      "--timeout", "2", "--quiet")
        assert failing.returncode == 3
        procs = [proc, failing, *follow_up_commands(out, srv.base_url)]
    scanned = assert_no_secret(texts_of(out, *procs), [URL_PASSWORD])
    figures.record("secrets", case="password in the API URL", texts=scanned, secrets=1)

