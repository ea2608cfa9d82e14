"""Secrets echoed by a hostile server: the bearer token, the refresh token and the password come
back in a 400 body, a text/plain 200, a non-ZIP 200, a 500 page and a getSeries answer that is
not JSON, literally, URL-encoded and in base64 (the basic-auth pair too). The one redaction
point (``harvester.redact``, applied by every ``HarvesterError``) keeps every form out of the
journal, harvest.json, metadata.csv, report.html, the exports, stdout and stderr."""
from __future__ import annotations

import base64
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from .hostile import (
    AUTH,
    PASSWORD,
    REFRESH,
    TOKEN,
    USER,
    build_hostile,
    cli,
    error_lines,
    failed_lines,
    run_args,
    scan,
    serve_hostile,
    statuses,
    assert_rerun_completes,
)


def echo(request: web.Request) -> str:
    """Everything a careless server could repeat: the header it got and the secrets, encoded."""
    pair = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    return (f"denied: Authorization={request.headers.get('Authorization')} token={TOKEN} "
            f"pw={quote(PASSWORD, safe='')} b64={base64.b64encode(TOKEN.encode()).decode()} basic={pair} "
            f"refresh {REFRESH} password: {PASSWORD}")


async def denied_400(request: web.Request) -> web.Response:  # NBIA's "access denied": 400, JSON type, text
    return web.Response(status=400, text=echo(request), content_type="application/json")


async def text_200(request: web.Request) -> web.Response:
    return web.Response(text=echo(request), content_type="text/plain")


async def not_a_zip_200(request: web.Request) -> web.Response:
    return web.Response(body=echo(request).encode(), content_type="application/octet-stream")


async def error_500(request: web.Request) -> web.Response:
    return web.Response(status=500, text=echo(request), content_type="text/plain")


ATTACKS = {"400 body echoing the secrets": denied_400, "text/plain 200 echoing them": text_200,
           "non-ZIP 200 echoing them": not_a_zip_200, "500 echoing them": error_500}


def test_secrets_echo_by_the_server_are_redacted_everywhere(tmp_path: Path, figures) -> None:
    h = build_hostile(len(ATTACKS) + 1)
    h.require_auth = True
    for uid, attack in zip(h.uids, ATTACKS.values()):
        h.attacks[uid] = attack
    out = tmp_path / "out"
    with serve_hostile(h):
        run = cli(*run_args(h, tmp_path, out, *AUTH))
        assert run.returncode == 1, (run.stdout[-2000:], run.stderr[-2000:])
        failed = failed_lines(run)
        assert len(failed) == len(ATTACKS), run.stdout
        assert all("***" in line or "HTTP" in line for line in failed), failed
        assert statuses(out)[h.uids[-1]] == "complete"  # the honest one
        follow = [cli("status", str(out)), cli("status", str(out), "--json"), cli("verify", str(out)),
                  cli("report", str(out)),
                  cli("export", str(out), "--csv", str(out / "export.csv"), "--tcia", str(out / "export.tcia"))]
        for proc in follow:
            assert proc.returncode in (0, 1), (proc.args, proc.stderr[-1500:])
        scanned = scan(out, run, *follow)
        assert (out / "report.html").exists() and (out / "export.csv").exists()
        rerun = assert_rerun_completes(h, tmp_path, out, *AUTH)
        scan(out, rerun)
    figures.record("issue14", family="secrets echoed by the server", attacks=len(ATTACKS), texts=scanned,
                   outcome="series failed with a redacted reason; exit 1; rerun completes",
                   messages=[line.split(": ", 2)[-1][:160] for line in failed])


async def series_not_json(request: web.Request) -> web.Response:
    return web.Response(text=echo(request), content_type="application/json")


def test_getseries_echoing_the_secrets_is_one_line_exit_3(tmp_path: Path, figures) -> None:
    h = build_hostile(2)
    h.require_auth = True
    h.attacks["getSeries"] = series_not_json
    out = tmp_path / "out"
    with serve_hostile(h):
        run = cli(*run_args(h, tmp_path, out, *AUTH))
        assert run.returncode == 3, run.stderr[-2000:]
        lines = error_lines(run)
        assert len(lines) == 1 and "not JSON" in lines[0] and "***" in lines[0], run.stderr
        scanned = scan(out, run)
        assert_rerun_completes(h, tmp_path, out, *AUTH)
    figures.record("issue14", family="secrets echoed by the server", attacks=1, texts=scanned,
                   outcome="getSeries not JSON: one redacted line, exit 3", message=lines[0][:200])


def test_redaction_of_every_form() -> None:
    """The unit under the end-to-end tests: each encoding of a registered secret, and the
    secret-shaped text of someone else's server (URL user info, token parameters, credentials)."""
    from harvester.redact import SECRETS, redact

    secret = "unit-S3cr3t/&+=pw"
    SECRETS.add(secret, user="bob")
    forms = [secret, quote(secret, safe=""), quote(secret), base64.b64encode(secret.encode()).decode(),
             base64.b64encode(f"bob:{secret}".encode()).decode(), base64.urlsafe_b64encode(secret.encode()).decode()]
    for form in forms:
        assert "S3cr3t" not in redact(f"x {form} y") and form.rstrip("=") not in redact(f"x {form} y")
    shaped = {"http://u:p4ssword@host/x": "p4ssword", "GET /a?access_token=abcdef123&b=1": "abcdef123",
              "?api_key=k3y-value": "k3y-value", "Authorization: Bearer eyJabc.def.ghi": "eyJabc",
              '{"refresh_token": "rt-12345678"}': "rt-12345678", "password=hunter2&x": "hunter2"}
    for text, secret_part in shaped.items():
        assert secret_part not in redact(text), text
    assert redact("basic auth and a key: select") == "basic auth and a key: select"  # words stay words
    assert len(redact("x" * 5000, 100)) == 103
