"""``harvester serve`` as a process: the base URL comes first, signals stop it, bad usage is exit 2."""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest

from harvester.server.serve import add_serve_arguments, build_archive, start_server

SPEC = "collections=1,patients=1,series=2,instances=2,size=2KiB,seed=5"


@contextmanager
def serving(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen([sys.executable, "-m", "harvester.server.serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        yield proc, first
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_prints_base_url_first_and_stops_on_signal(synthetic_cache: Path, signum: int) -> None:
    with serving("--synthetic", SPEC, "--cache-dir", str(synthetic_cache), "--faults", "latency=1ms") as (proc, url):
        assert url.startswith("http://127.0.0.1:") and url.endswith("/nbia-api/services/v4")
        status, body = get(url + "/getCollectionValues")
        assert status == 200 and json.loads(body) == [{"Collection": "SYN-LUNG-CT"}]
        stats = json.loads(get(url.split("/nbia-api/")[0] + "/_harvester/stats")[1])
        assert stats["requests"] == {"getCollectionValues": 1}
        proc.send_signal(signum)
        assert proc.wait(15) == 0


def test_serves_a_harvest_directory(tmp_path: Path) -> None:
    (tmp_path / "harvest.json").write_text(json.dumps({"schema": "harvester/1", "series": []}), encoding="utf-8")
    with serving(str(tmp_path)) as (proc, url):
        assert get(url + "/getSeries") == (200, b"")  # no match: an empty body, as NBIA answers
        proc.terminate()
        assert proc.wait(15) == 0


def test_numbers_as_strings_option(synthetic_cache: Path) -> None:
    with serving("--synthetic", SPEC, "--cache-dir", str(synthetic_cache), "--numbers-as-strings") as (proc, url):
        status, body = get(url + "/getSeries")
        assert status == 200
        rows = json.loads(body)
        assert rows and all(isinstance(r["ImageCount"], str) and r["FileSize"].endswith(".0") for r in rows)
        proc.terminate()
        assert proc.wait(15) == 0


def test_auth_from_a_password_file(synthetic_cache: Path, tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n", encoding="utf-8")
    with serving("--synthetic", SPEC, "--cache-dir", str(synthetic_cache), "--auth", f"alice:{secret}") as (proc, url):
        assert get(url + "/getCollectionValues")[0] == 401
        root = url.split("/nbia-api/")[0]
        form = b"grant_type=password&client_id=nbia&username=alice&password=hunter2"
        with urllib.request.urlopen(urllib.request.Request(root + "/nbia-api/oauth/token", data=form), timeout=10) as resp:
            token = json.loads(resp.read())["access_token"]
        assert get(url + "/getCollectionValues", {"Authorization": f"Bearer {token}"})[0] == 200
        proc.terminate()
        proc.wait(15)
        assert proc.stderr is not None
        assert "hunter2" not in proc.stderr.read()


@pytest.mark.parametrize("args,needle", [
    ([], "exactly one"),
    (["/nonexistent/harvest-dir"], "harvest.json"),
    (["--synthetic", "colections=2"], "colections"),
    (["--synthetic", "size=3B"], "size"),
    (["--synthetic", SPEC, "--faults", "eror=1"], "eror"),
    (["--synthetic", SPEC, "--auth", "alice"], "--auth"),
    (["--synthetic", SPEC, "--auth", "alice:/nonexistent/pw"], "password file"),
    (["DIR", "--synthetic", SPEC], "exactly one"),
    (["--synthetic", SPEC, "--zip", "bzip2"], "--zip"),
])
def test_bad_usage_is_one_line_and_exit_2(args: list[str], needle: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "harvester.server.serve", *args, "--cache-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harvester: error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_zip_format_and_include_md5_refusal_options(synthetic_cache: Path) -> None:
    import io
    import zipfile

    with serving("--synthetic", SPEC, "--cache-dir", str(synthetic_cache), "--zip", "stored",
                 "--refuse-include-md5") as (proc, url):
        uid = json.loads(get(url + "/getSeries")[1])[0]["SeriesInstanceUID"]
        status, body = get(f"{url}/getImage?SeriesInstanceUID={uid}&IncludeMD5=yes")
        assert status == 400 and b"'IncludeMD5'" in body
        status, body = get(f"{url}/getImageWithMD5Hash?SeriesInstanceUID={uid}")
        infos = zipfile.ZipFile(io.BytesIO(body)).infolist()
        assert status == 200 and infos and all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        proc.terminate()
        assert proc.wait(15) == 0


def test_port_in_use_is_exit_2(synthetic_cache: Path) -> None:
    with serving("--synthetic", SPEC, "--cache-dir", str(synthetic_cache)) as (proc, url):
        port = url.split(":")[2].split("/")[0]
        second = subprocess.run([sys.executable, "-m", "harvester.server.serve", "--synthetic", SPEC, "--cache-dir",
                                 str(synthetic_cache), "--port", port], capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and second.stderr.startswith("harvester: error: cannot listen")
        proc.terminate()


@pytest.mark.anyio
async def test_start_server_in_process(synthetic_cache: Path) -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    archive = build_archive(parser.parse_args(["--synthetic", SPEC, "--cache-dir", str(synthetic_cache)]))
    runner, base_url = await start_server(archive, "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(base_url + "/getPatient") as resp:
                assert [p["PatientId"] for p in await resp.json()] == ["SYN-LUNG-CT-0001"]
    finally:
        await runner.cleanup()
