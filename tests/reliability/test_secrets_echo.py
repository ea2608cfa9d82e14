"""Secrets echoed by a hostile server: the bearer token, the refresh token and the password come
back in a 400 body, a text/plain 200, a non-ZIP 200, a 500 page and a getSeries answer that is
not JSON, literally, URL-encoded and in base64 (the basic-auth pair too), and inside a JSON body
(``/`` escaped as ``\\/``, as NBIA writes it) or an XML one (``&amp;``). The one redaction
point (``harvester.redact``, applied by every ``HarvesterError``) keeps every form out of the
journal, harvest.json, metadata.csv, report.html, the exports, stdout and stderr."""
from __future__ import annotations

import base64
import html
import json
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


def bare(request: web.Request) -> str:
    """The secrets with nothing around them that looks like a secret (no ``token=``, no ``Bearer``)."""
    return f"login failed for {USER}:{PASSWORD} with session {TOKEN} (renew {REFRESH})"


async def json_400(request: web.Request) -> web.Response:  # as NBIA's own JSON: "/" written "\/"
    body = json.dumps({"error": bare(request)}).replace("/", "\\/")
    return web.Response(status=400, text=body, content_type="application/json")


async def xml_400(request: web.Request) -> web.Response:
    return web.Response(status=400, text=f"<error>{html.escape(bare(request))}</error>", content_type="application/xml")


ATTACKS = {"400 body echoing the secrets": denied_400, "text/plain 200 echoing them": text_200,
           "non-ZIP 200 echoing them": not_a_zip_200, "500 echoing them": error_500,
           "JSON 400 escaping them": json_400, "XML 400 escaping them": xml_400}


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
    for name in ("auth_token", "access-token", "x-amz-security-token", "client-secret", "key", "sig"):
        assert "v4lue99" not in redact(f"GET /t?{name}=v4lue99&b=1"), name


def test_echoed_secrets_are_masked_in_every_escaping_and_after_white_space_is_folded() -> None:
    """JSON (``\\/``, ``\\"``, ``\\uXXXX``), XML entities, a password with two spaces in it through
    ``excerpt`` (which folds white space), and a secret too short to mask alone, echoed as the
    ``user:secret`` pair."""
    from harvester.redact import SECRETS, excerpt, redact

    for secret in ('Pw/Secr+et="42x"', "a&b<c>pässword", "my  double  space"):
        SECRETS.add(secret, user="carol")
        echoes = {"json": json.dumps({"e": f"login failed for carol:{secret}"}).replace("/", "\\/"),
                  "json-ascii": json.dumps(f"bad {secret}", ensure_ascii=True),
                  "json-utf8": json.dumps(f"bad {secret}", ensure_ascii=False),
                  "xml": f"<error>{html.escape(secret, quote=False)}</error>", "html": html.escape(f"x {secret}"),
                  "plain": f"login failed for carol:{secret}   (tab\there)"}
        for how, body in echoes.items():
            for shown in (excerpt(body), excerpt(body.encode()), redact(body)):
                assert secret not in shown and " ".join(secret.split()) not in shown, (how, shown)
                assert "Secr" not in shown and "ssword" not in shown, (how, shown)
    SECRETS.add("p1!", user="dave")
    assert redact("login failed for dave:p1! here") == "login failed for dave:*** here"
    assert redact("a p1! word") == "a p1! word"   # alone it is too short to mask
    assert len(redact("x" * 5000, 100)) == 103


def test_a_percent_encoded_url_password_is_masked_as_it_is_sent() -> None:
    """aiohttp sends ``user:password@`` decoded: that password, and its basic-auth pair in base64,
    are the ones a server echoes."""
    from harvester.config import Config
    from harvester.redact import redact
    from harvester.source.http import register_config_secrets

    register_config_secrets(Config(api_url="http://b%40b:UrlPw%2Fsecret99@127.0.0.1:8080/v4"))
    pair = base64.b64encode(b"b@b:UrlPw/secret99").decode()
    for echoed in ("login failed for b@b:UrlPw/secret99", f"Authorization: Basic {pair}", f"got {pair} back",
                   "pw UrlPw%2Fsecret99"):
        assert "secret99" not in redact(echoed) and pair.rstrip("=") not in redact(echoed), redact(echoed)
