"""Text a hostile server (or a careless user) hands us that once ended in a traceback or reached
the terminal raw: control characters in an error the CLI prints last, in ``-v`` log lines and
in ``--log-file``; an access token with CR/LF in it; a redirect to a URL carrying credentials;
a port that is not a port; a bearer token that cannot go in a header. Each is one line, the
right exit code, and nothing raw on the terminal."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from aiohttp import web

from .hostile import AUTH, ENV, build_hostile, cli, error_lines, run_args, serve_hostile, statuses

ESCAPES = "\x1b]0;PWNED-TITLE\x07\x1b[2J\x1b[31m"


def assert_no_raw_control(*texts: str) -> None:
    for text in texts:
        assert "\x1b" not in text and "\x07" not in text, text[-600:]


def one_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-1500:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("harvester: error: "), proc.stderr
    return lines[0]


async def escapes_400(request: web.Request) -> web.Response:
    return web.Response(status=400, text=f"bad request {ESCAPES} here", content_type="text/plain")


def test_control_characters_in_the_last_error_line_are_shown_escaped(tmp_path: Path) -> None:
    h = build_hostile(2)
    h.attacks["getSeries"] = escapes_400
    with serve_hostile(h):
        proc = cli(*run_args(h, tmp_path, tmp_path / "out"))
    lines = error_lines(proc)
    assert proc.returncode in (2, 3) and len(lines) == 1, proc.stderr[-1500:]
    assert "\\x1b]0;PWNED-TITLE\\x07" in lines[0], lines[0]   # shown, as text
    assert_no_raw_control(proc.stdout, proc.stderr)


def test_control_characters_in_log_lines_and_the_log_file_are_shown_escaped(tmp_path: Path) -> None:
    h = build_hostile(2)
    h.attacks[h.uids[0]] = escapes_400
    out, log = tmp_path / "out", tmp_path / "run.log"
    with serve_hostile(h):
        proc = cli(*run_args(h, tmp_path, out), "-v", "--no-progress", "--log-file", str(log))
    assert proc.returncode == 1, proc.stderr[-1500:]
    assert statuses(out) == {h.uids[0]: "failed", h.uids[1]: "complete"}
    assert "PWNED-TITLE" in proc.stderr and "PWNED-TITLE" in log.read_text("utf-8")   # the message is there
    assert_no_raw_control(proc.stdout, proc.stderr, log.read_text("utf-8"))


async def token_with_crlf(request: web.Request) -> web.Response:
    return web.json_response({"access_token": "abc\r\nX-Injected: yes", "expires_in": 3600})


def test_an_access_token_with_cr_lf_is_one_line_exit_3(tmp_path: Path) -> None:
    h = build_hostile(2)
    h.attacks["token"] = token_with_crlf
    with serve_hostile(h):
        line = one_line(cli(*run_args(h, tmp_path, tmp_path / "out", *AUTH)), 3)
    assert "access_token" in line and "X-Injected" not in line, line


def test_a_redirect_to_a_url_with_credentials_is_refused_in_one_line(tmp_path: Path) -> None:
    h = build_hostile(2)

    async def to_userinfo(request: web.Request) -> web.Response:
        target = f"http://mallory:leaked-9f3@{request.host}{request.path_qs}&again=1"
        return web.Response(status=302, headers={"Location": target})

    h.attacks["getSeries"] = to_userinfo
    with serve_hostile(h):
        line = one_line(cli(*run_args(h, tmp_path, tmp_path / "out", *AUTH)), 3)
    assert "credentials" in line and "leaked-9f3" not in line, line


def test_a_port_that_is_not_a_port_is_a_usage_error(tmp_path: Path) -> None:
    query = tmp_path / "q.yaml"
    query.write_text("select:\n  - collection: X\n")
    for url in ("http://127.0.0.1:99999/nbia-api/services/v4", "http://alice:pw-77a1@127.0.0.1:abc/v4"):
        proc = subprocess.run([sys.executable, "-m", "harvester", "plan", str(query), "--api-url", url],
                              capture_output=True, text=True, env=ENV, timeout=60)
        line = one_line(proc, 2)
        assert "invalid port" in line and "pw-77a1" not in line, line
        env = {**ENV, "HARVESTER_API_URL": url}
        proc = subprocess.run([sys.executable, "-m", "harvester", "plan", str(query)], capture_output=True,
                              text=True, env=env, timeout=60)
        assert "invalid port" in one_line(proc, 2)


def test_a_bearer_token_is_for_dicomweb_and_one_word(tmp_path: Path) -> None:
    query = tmp_path / "q.yaml"
    query.write_text("select:\n  - collection: X\n")
    env = {**os.environ, "TOK": "ab\r\ncd-s3cret", "GOOD": "good-token-1"}
    nbia = subprocess.run([sys.executable, "-m", "harvester", "plan", str(query), "--api-url",
                           "http://127.0.0.1:9/v4", "--token-env", "GOOD"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert "--token-env is for --source dicomweb" in one_line(nbia, 2)
    bad = subprocess.run([sys.executable, "-m", "harvester", "plan", str(query), "--source", "dicomweb", "--url",
                          "http://127.0.0.1:9/dicom-web", "--token-env", "TOK"], capture_output=True, text=True,
                         env=env, timeout=60)
    line = one_line(bad, 2)
    assert "no usable bearer token" in line and "s3cret" not in line, line
