"""Containment: nothing the harvester writes, renames, deletes or serves lies outside DIR, whatever
a harvest.json or a journal says, whatever links are planted inside DIR, and whatever is swapped
under ``harvester serve`` after it loaded DIR.

Each test builds its hostile directory here (real files, real symlinks, a real loopback NBIA
server where a fetch is involved), runs the real CLI with ``-X faulthandler``, and checks the
attack, the one line printed, the exit code, that a decoy tree beside DIR is byte for byte what
it was (``tree_state`` never follows a link), and that a rerun after undoing the attack completes.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from harvest_helpers import harvest, manifest, select_all
from harvester.containment import inside, open_dir, parts_of
from harvester.errors import UnsafeArchiveError, UnsafePathError
from harvester.store.layout import assign_paths, name_key
from harvester.server.archive import Archive, load_harvest_dir
from harvester.server.testing import serve_in_thread

from .handserver import HandArchive, dicom_series, honest_zip, serve_app, serve_hand

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
FAST_FLAGS = ["--no-progress", "--retries", "2", "--series-retries", "0", "--timeout", "10"]


# ---------------------------------------------------------------------------------- helpers

def cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child process, with faulthandler on (a hang or a crash shows its stack)."""
    return subprocess.run([sys.executable, "-X", "faulthandler", "-m", "harvester", *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=300, stdin=subprocess.DEVNULL, cwd=cwd)


def tree_state(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (and ``root`` itself) -> what it is: a folder, a link and its
    target, or a file's MD5 and mode. Links are recorded, never followed."""
    state: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [*dirnames, *filenames, *([""] if dirpath == str(root) else [])]:
            path = Path(dirpath, name) if name else Path(dirpath)
            key = str(path.relative_to(root))
            st_ = os.lstat(path)
            if os.path.islink(path):
                state[key] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                state[key] = f"dir {oct(st_.st_mode)}"
            else:
                state[key] = f"file {oct(st_.st_mode)} {hashlib.md5(path.read_bytes()).hexdigest()}"
    return state


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    assert "Fatal Python error" not in proc.stderr, proc.stderr[-3000:]


def error_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """The one ``harvester: error:`` line of a stop with exit ``code``."""
    no_traceback(proc)
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("harvester: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def record(figures: Any, case: str, attacks: int, code: int | str, line: str, tmp: Path) -> None:
    """One row of docs/reliability.md's containment table (paths of this machine left out)."""
    line = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", line.replace(str(tmp), "<tmp>"))
    figures.record("containment", case=case, attacks=attacks, exit=code, line=line)


def write_query(path: Path, query: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(query))
    return path


def series_by_path(out: Path) -> list[dict[str, Any]]:
    """The complete records of DIR's harvest.json, deepest folder paths first."""
    return [r for r in manifest(out)["series"] if r["status"] == "complete"]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, small_archive: Archive) -> Path:
    """One complete harvest of the small archive (descriptive layout), copied by each test."""
    out = tmp_path_factory.mktemp("template") / "harvest"
    with serve_in_thread(small_archive) as srv:
        assert harvest(srv.base_url, out, select_all(small_archive)).ok
    return out


@pytest.fixture
def place(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """``(DIR's parent, decoy)``: the decoy tree beside DIR holds someone else's files."""
    decoy = tmp_path / "decoy"
    (decoy / "keep").mkdir(parents=True)
    (decoy / "keep" / "notes.txt").write_text("someone else's file\n")
    (decoy / "x.dcm").write_bytes(b"not yours")
    yield tmp_path, decoy


def copy_harvest(template: Path, out: Path) -> Path:
    shutil.copytree(template, out, symlinks=True)
    return out


# ------------------------------------------------------------------ verify --repair outside DIR

def test_verify_repair_never_writes_outside_dir(template, place, server, small_archive, figures):
    """harvest.json and the journal list files as ``../x`` and ``/abs``, and a series folder is a
    link to a copy outside DIR. Plain verify reports each with its record (exit 1). --repair stops
    with exit 3 and one line naming the link; without the link it refuses the other two, naming
    the journal line (exit 1), and still mends the honest damage beside them. Nothing outside DIR
    is ever created or replaced, and the next run completes."""
    root, decoy = place
    out = copy_harvest(template, root / "out")
    doc = manifest(out)
    recs = [r for r in doc["series"] if r["status"] == "complete"]
    absolute = root / "planted-absolute.dcm"
    # 1: a file listed as ../decoy/x.dcm (exists, wrong bytes: repair would replace it)
    recs[0]["files"][0]["path"] = "../decoy/x.dcm"
    # 2: an absolute path to a file that does not exist (repair would create it)
    recs[1]["files"][0]["path"] = str(absolute)
    # 3: a series folder swapped for a link to a copy outside DIR, one file damaged there
    linked = recs[2]
    real = out / linked["path"]
    outside = decoy / "linked-series"
    shutil.move(real, outside)
    real.symlink_to(outside, target_is_directory=True)
    first = outside / Path(linked["files"][0]["path"]).name
    first.write_bytes(b"damaged" + first.read_bytes()[7:])
    # 5: one file of another series is a link to a file outside DIR (verify would read it,
    # --repair would hash and replace it)
    file_link = out / recs[4]["files"][0]["path"]
    file_link.unlink()
    file_link.symlink_to(decoy / "x.dcm")
    # 4: honest damage inside DIR, which --repair must still mend
    honest = out / recs[3]["files"][0]["path"]
    honest.write_bytes(honest.read_bytes()[:-1] + bytes([honest.read_bytes()[-1] ^ 0xFF]))
    (out / "harvest.json").write_text(json.dumps(doc, indent=1))
    # and the journal agrees with the hostile harvest.json (it is replayed over it on open)
    journal = out / ".harvester" / "journal.jsonl"
    with journal.open("a") as fh:
        for rec in recs[:2]:
            fh.write(json.dumps({"event": "commit", "t": "2026-01-01T00:00:00Z", "series": rec}) + "\n")
    before = tree_state(decoy)
    api = ["--api-url", server.base_url, "--retries", "2", "--timeout", "10"]

    plain = cli("verify", out)
    no_traceback(plain)
    assert plain.returncode == 1
    # the record is named where the next run reads it from: the journal line replayed over harvest.json
    assert "journal.jsonl line" in plain.stdout and "'../decoy/x.dcm'" in plain.stdout
    assert f"refusing absolute path '{absolute}'" in plain.stdout
    assert f"{out}/{linked['path']} is a symbolic link" in plain.stdout
    assert f"{out}/{recs[4]['files'][0]['path']} is a symbolic link" in plain.stdout
    record(figures, "`verify`: harvest.json lists a file as `../x`, as `/abs`, through a linked series folder, "
           "and a file is a link outside", 4, 1, next(line for line in plain.stdout.splitlines() if "climbs out" in line), root)

    line = error_line(cli("verify", out, "--repair", *api), 3)
    assert f"{out}/{linked['path']} is a symbolic link inside the output directory" in line
    assert tree_state(decoy) == before
    record(figures, "`verify --repair`: a series folder is a link to a copy outside DIR", 1, 3, line, root)

    real.unlink()                      # the link goes, the real folder comes back
    shutil.move(outside, real)
    before = tree_state(decoy)
    repair = cli("verify", out, "--repair", *api)
    no_traceback(repair)
    assert repair.returncode == 1, repair.stdout + repair.stderr
    refused = [line for line in repair.stdout.splitlines() if line.startswith("refused: ")]
    assert any("journal.jsonl line" in line and "../decoy/x.dcm" in line for line in refused), repair.stdout
    assert any(str(absolute) in line for line in refused), repair.stdout
    assert any(f"{recs[4]['files'][0]['path']} is a symbolic link" in line for line in refused), repair.stdout
    assert f"repaired: {recs[3]['files'][0]['path']}" in repair.stdout
    assert tree_state(decoy) == before
    assert not absolute.exists()
    record(figures, "`verify --repair`: harvest.json and the journal list files as `../x` and `/abs`; a file is "
           "a link outside", 3, 1,
           next(line for line in refused if "journal.jsonl line" in line), root)

    rerun = cli("run", write_query(root / "q.yaml", select_all(small_archive)), "-o", out,
                "--api-url", server.base_url, *FAST_FLAGS)
    no_traceback(rerun)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    # the refused records were named once, by the first command that read them into the state
    # database (--repair above): they are gone from it, so the run fetches them again, silently
    assert "journal.jsonl line" not in rerun.stderr
    check = cli("verify", out)
    assert check.returncode == 0, check.stdout
    assert tree_state(decoy) == before


def test_a_forged_journal_cannot_move_or_delete_anything(template, place, server, small_archive, figures):
    """Journal lines of the right shape that would move a series into ``.harvester/tmp`` (emptied
    on open), move ``.harvester`` itself, or move a folder outside DIR: each is refused with a
    warning naming it; no verified file is lost, nothing outside DIR moves, the run completes."""
    root, decoy = place
    out = copy_harvest(template, root / "out")
    victim = series_by_path(out)[0]
    forged = [
        {"event": "forget", "uid": victim["SeriesInstanceUID"], "path": victim["path"], "trash": ".harvester/tmp/gone"},
        {"event": "forget", "uid": "9.9.1", "path": ".harvester", "trash": ".harvester/trash/x"},
        {"event": "forget", "uid": "9.9.2", "path": "../decoy/keep", "trash": ".harvester/trash/y"},
        {"event": "forget", "uid": "9.9.3", "path": victim["path"], "trash": "/tmp/elsewhere"},
    ]
    with (out / ".harvester" / "journal.jsonl").open("a") as fh:
        fh.writelines(json.dumps(line) + "\n" for line in forged)
    before, files_before = tree_state(decoy), tree_state(out / victim["path"])
    proc = cli("run", write_query(root / "q.yaml", select_all(small_archive)), "-o", out,
               "--api-url", server.base_url, *FAST_FLAGS)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("harvester: warning:")]
    assert len(warnings) == len(forged), proc.stderr
    assert tree_state(decoy) == before
    assert (out / ".harvester" / "journal.jsonl").is_file()
    assert tree_state(out / victim["path"]) == files_before or cli("verify", out).returncode == 0
    assert cli("verify", out).returncode == 0
    record(figures, "`run`: forged journal lines move a series into `.harvester/tmp`, `.harvester` itself, "
           "a folder outside DIR", len(forged), 0, warnings[0], root)


@pytest.mark.parametrize("prune", [False, True], ids=["changed-series-refetched", "prune"])
def test_a_record_naming_a_folder_of_other_series_loses_none_of_them(prune, template, place, server, small_archive):
    """A harvest.json record (state.db gone: someone else's DIR) whose folder is the collection's:
    a sync that refetched that series (its size changed) replaced the whole collection folder, and
    the other series' verified files were deleted; a --prune of it moved them all to the trash.
    Now the folder is refused (it holds folders: not one series'), in one line, and every
    verified file is where it was."""
    root, decoy = place
    out = copy_harvest(template, root / "out")
    (out / ".harvester" / "state.db").unlink()
    doc = manifest(out)
    victim = series_by_path(out)[0]
    collection = victim["path"].split("/")[0]
    for rec in doc["series"]:
        if rec["SeriesInstanceUID"] == victim["SeriesInstanceUID"]:
            rec["path"] = collection
            rec["metadata"]["FileSize"] = 1   # sync sees it changed and fetches it again
    (out / "harvest.json").write_text(json.dumps(doc))
    query = select_all(small_archive)
    if prune:
        query["exclude"] = {"series": [victim["SeriesInstanceUID"]]}
    before = tree_state(out / collection)
    proc = cli("sync", write_query(root / "q.yaml", query), "-o", out, "--api-url", server.base_url, *FAST_FLAGS,
               *(["--prune"] if prune else []))
    no_traceback(proc)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "not one series' folder" in error_line(proc, 3)
    assert tree_state(out / collection) == before   # nothing replaced, moved or deleted
    assert not any((out / ".harvester" / "trash").rglob("*.dcm")) if (out / ".harvester" / "trash").exists() else True


@pytest.mark.parametrize("name", ["lock", "plan.db"])
def test_a_folder_where_the_lock_or_the_plan_belongs_is_one_line(name, template, place, server, small_archive):
    """``.harvester/lock`` or ``.harvester/plan.db`` as a folder ended run, sync, verify --repair
    and export --manifest in a traceback (IsADirectoryError)."""
    root, _decoy = place
    out = copy_harvest(template, root / "out")
    target = out / ".harvester" / name
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    (target / "sub").mkdir(parents=True)
    query = write_query(root / "q.yaml", select_all(small_archive))
    before = tree_state(out)
    procs = [cli("run", query, "-o", out, "--api-url", server.base_url, *FAST_FLAGS),
             cli("sync", query, "-o", out, "--api-url", server.base_url, *FAST_FLAGS)]
    if name == "lock":
        procs += [cli("verify", out, "--repair"), cli("export", out, "--manifest")]
    for proc in procs:
        line = error_line(proc, 3)
        assert f"{name} is a folder" in line and "remove it" in line, line
    assert tree_state(out) == before
    shutil.rmtree(target)
    assert cli("run", query, "-o", out, "--api-url", server.base_url, *FAST_FLAGS).returncode == 0


# --------------------------------------------------------- clean-up of a failed first run

def test_failed_first_run_cleanup_removes_only_what_it_created(template, place, figures):
    """A complete harvest lives in A/; a first run into A/B/C/out fails (the archive refuses it)
    while another harvest lands in A/B/other. The failed run removes out, C and nothing else:
    A/ is byte for byte what it was plus the other harvest, untouched."""
    from aiohttp import web

    root, decoy = place
    a = copy_harvest(template, root / "A")
    other = a / "B" / "other"

    async def refuse(request: web.Request) -> web.Response:
        if not other.exists():   # another run finishes its harvest next to ours, meanwhile
            shutil.copytree(template, other, symlinks=True)
        return web.Response(status=400, text="access denied\n")

    app = web.Application()
    app.router.add_get("/nbia-api/services/v4/{endpoint}", refuse)
    before = tree_state(a)
    with serve_app(app) as base:
        query = write_query(root / "q.yaml", {"select": [{"collection": "SYN-0001"}]})
        proc = cli("run", query, "-o", a / "B" / "C" / "out", "--api-url", f"{base}/nbia-api/services/v4",
                   *FAST_FLAGS)
    line = error_line(proc, 2)
    assert "access denied" in line, line
    record(figures, "`run`: a failed first run into `A/B/C/out` while another harvest lands in `A/B/other`", 1, 2,
           line + " (A/ and A/B/other kept byte for byte)", root)
    assert other.is_dir(), "the other run's harvest was deleted"
    assert not (a / "B" / "C").exists()
    after = tree_state(a)
    assert {k: v for k, v in after.items() if k != "B" and not k.startswith("B/")} == before
    assert tree_state(other) == tree_state(template)
    assert cli("verify", a).returncode == 0 and cli("verify", other).returncode == 0


# --------------------------------------------------------- symlinks planted inside DIR

LINK_PLACES = [".harvester", ".harvester/tmp", "licenses", "collection", "patient", "study", "series"]


@pytest.mark.parametrize("where", LINK_PLACES)
def test_symlinks_planted_inside_dir_are_refused(where, template, place, server, small_archive, figures):
    """A folder inside DIR is a link to a folder outside it. ``run`` (resuming: one series of a
    study is missing) stops with exit 3 and one line naming the link; nothing outside changes;
    once the link is replaced by the real folder, the rerun completes."""
    root, decoy = place
    out = copy_harvest(template, root / "out")
    recs = series_by_path(out)
    victim = next(r for r in recs if r["Collection"].startswith("SYN"))
    sibling = next(r for r in recs if r is not victim and Path(r["path"]).parent == Path(victim["path"]).parent)
    # the sibling series is missing: the resumed run fetches it into the same study folder
    doc = manifest(out)
    doc["series"] = [r for r in doc["series"] if r["SeriesInstanceUID"] != sibling["SeriesInstanceUID"]]
    (out / "harvest.json").write_text(json.dumps(doc, indent=1))
    shutil.rmtree(out / sibling["path"])   # the state database records it failed on open
    parts = Path(victim["path"]).parts
    depth = {"collection": 1, "patient": 2, "study": 3}
    if where in depth:
        rel = Path(*parts[:depth[where]])
    elif where == "series":
        rel = Path(sibling["path"])
    else:
        rel = Path(where)
    link, target = out / rel, decoy / "linked" / rel.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if link.exists():
        shutil.move(link, target)
    else:
        target.mkdir()
    if where == ".harvester/tmp":
        (target / "someone-elses.staging").mkdir()
        (target / "someone-elses.staging" / "1.dcm").write_bytes(b"keep me")
    if where == "licenses":
        (target / ".precious.txt.1.tmp").write_text("keep me")   # the name of an atomic_write temp
    link.symlink_to(target, target_is_directory=True)
    before = tree_state(decoy)

    query = write_query(root / "q.yaml", select_all(small_archive))
    proc = cli("run", query, "-o", out, "--api-url", server.base_url, *FAST_FLAGS)
    line = error_line(proc, 3)
    assert f"{out}/{rel} is a symbolic link inside the output directory" in line, line
    assert "remove the link" in line
    assert tree_state(decoy) == before
    record(figures, f"`run`: `{where}` is a link to a folder outside DIR", 1, 3, line, root)

    link.unlink()
    if where in (".harvester/tmp", "licenses"):
        shutil.rmtree(target)      # only the harvester's own scratch: the next run remakes it
    else:
        shutil.move(target, link)
    rerun = cli("run", query, "-o", out, "--api-url", server.base_url, *FAST_FLAGS)
    no_traceback(rerun)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert sibling["SeriesInstanceUID"] in {r["SeriesInstanceUID"] for r in series_by_path(out)}
    assert cli("verify", out).returncode == 0


# ------------------------------------------------------ serve: swapped after loading

def _get(base_url: str, endpoint: str, **params: str) -> tuple[int | None, bytes]:
    """One GET; (status, body) as far as it came (None when the connection broke first)."""
    url = urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    status: int | None = None
    body = b""
    try:
        conn.request("GET", f"{url.path}/{endpoint}?{urlencode(params)}")
        resp = conn.getresponse()
        status = resp.status
        try:
            body = resp.read()
        except http.client.IncompleteRead as exc:
            body = exc.partial
    except (ConnectionError, http.client.HTTPException):
        pass
    finally:
        conn.close()
    return status, body


@pytest.mark.parametrize("swap", ["file", "series folder"])
def test_serve_refuses_a_file_swapped_for_a_symlink_after_loading(swap, template, place, figures):
    """``serve DIR`` loaded DIR; then a file (or its whole series folder) is swapped for a link to
    a look-alike outside DIR. getSingleImage and getImage never send the outside bytes: the
    download is cut short. Untouched series are still served whole."""
    root, decoy = place
    out = copy_harvest(template, root / "out")
    archive = load_harvest_dir(out)
    recs = series_by_path(out)
    victim, healthy = recs[0], recs[1]
    secret = b"SECRET-OUTSIDE-DIR-" * 64
    first = out / victim["files"][0]["path"]
    if swap == "file":
        (decoy / "look-alike.dcm").write_bytes(secret)
        first.unlink()
        first.symlink_to(decoy / "look-alike.dcm")
    else:
        folder = out / victim["path"]
        shutil.copytree(folder, decoy / "look-alike")
        for f in (decoy / "look-alike").iterdir():
            f.write_bytes(secret)
        shutil.rmtree(folder)
        folder.symlink_to(decoy / "look-alike", target_is_directory=True)
    with serve_in_thread(archive) as srv:
        status, body = _get(srv.base_url, "getSingleImage", SeriesInstanceUID=victim["SeriesInstanceUID"],
                            SOPInstanceUID=victim["files"][0]["SOPInstanceUID"])
        assert b"SECRET-OUTSIDE-DIR" not in body
        assert status != 200 or len(body) < victim["files"][0]["size"]
        status, body = _get(srv.base_url, "getImage", SeriesInstanceUID=victim["SeriesInstanceUID"])
        assert b"SECRET-OUTSIDE-DIR" not in body
        with pytest.raises(zipfile.BadZipFile):
            zipfile.ZipFile(io.BytesIO(body)).testzip()
        status, body = _get(srv.base_url, "getImage", SeriesInstanceUID=healthy["SeriesInstanceUID"])
        assert status == 200
        with zipfile.ZipFile(io.BytesIO(body)) as zf:
            assert zf.testzip() is None
            assert len([n for n in zf.namelist() if n.endswith(".dcm")]) == len(healthy["files"])
    record(figures, f"`serve`: a {swap} swapped for a link after DIR was loaded (getSingleImage, getImage)", 2,
           "-", "the download is cut short; no byte from outside DIR is sent; other series are served whole",
           root)


# ------------------------------------------------------ one case-folding rule

def test_file_and_folder_names_fold_case_alike():
    """``ß`` and ``SS`` differ under ``lower()`` but not under ``casefold()``: folders and ZIP
    entry names now follow the same rule, so both pairs are one name (one folder, one file on
    macOS or Windows)."""
    from harvester.config import Limits
    from harvester.unpack import _classify_entries

    assert "ß".lower() != "SS".lower() and name_key("ß") == name_key("SS")
    paths = assign_paths([("1.1", {"SeriesInstanceUID": "1.1", "Collection": "Straße"}),
                          ("1.2", {"SeriesInstanceUID": "1.2", "Collection": "STRASSE"})], "{Collection}")
    assert name_key(paths["1.1"]) != name_key(paths["1.2"])   # the second folder got a suffix
    infos = [zipfile.ZipInfo("Straße.dcm"), zipfile.ZipInfo("STRASSE.dcm")]
    with pytest.raises(UnsafeArchiveError, match="repeats the entry name"):
        _classify_entries(infos, "1.1", Limits(), None)


def test_a_collection_named_like_the_harvesters_folder_stays_out_of_it():
    paths = assign_paths([("1.1", {"SeriesInstanceUID": "1.1", "Collection": ".harvester", "PatientID": "tmp"})],
                         "classic")
    assert not paths["1.1"].startswith(".harvester/")


def test_an_archive_naming_a_collection_like_the_harvesters_folder_loses_nothing(tmp_path, figures):
    """A hostile archive names its collection ``.harvester`` and a patient ``tmp`` (classic
    layout: ``{Collection}/{PatientID}/...``): the series lands in ``_.harvester/``, not in the
    harvester's tmp/ that every open empties, so it is still complete after the rerun, and the
    rerun downloads nothing again."""
    uid = "1.2.826.0.1.3680043.2.1125.901"
    files = dicom_series(uid, seed="reserved")
    archive = HandArchive(collections=[".harvester"])
    archive.series = [{"SeriesInstanceUID": uid, "StudyInstanceUID": "1.2.826.0.1.3680043.2.1125.9",
                       "Collection": ".harvester", "PatientID": "tmp", "Modality": "CT",
                       "ImageCount": len(files), "FileSize": sum(len(d) for _, d in files)}]
    archive.zips[uid] = honest_zip(files)
    out = tmp_path / "out"
    query = write_query(tmp_path / "q.yaml", {"select": [{"series": [uid]}]})
    with serve_hand(archive) as url:
        for _ in range(2):
            proc = cli("run", query, "-o", out, "--api-url", url, "--layout", "classic", *FAST_FLAGS)
            no_traceback(proc)
            assert proc.returncode == 0, proc.stdout + proc.stderr
    check = cli("verify", out)   # the files are still there (under .harvester/tmp they were emptied)
    assert check.returncode == 0, check.stdout
    rec = manifest(out)["series"][0]
    assert rec["status"] == "complete" and rec["path"].startswith("_.harvester/tmp/"), rec["path"]
    assert archive.downloads[uid] == 1
    record(figures, "`run` twice: the archive names a collection `.harvester` and a patient `tmp`", 1, 0,
           f"stored under {rec['path'].split('/')[0]}/, still complete after the rerun", tmp_path)


# ------------------------------------------------------ the containment function itself

@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "..", ".", "", "/", "\\", "\x00", "C:", "ß", "~", " "]),
                max_size=8).map("".join))
def test_inside_refuses_every_path_that_could_leave_dir(tmp_path_factory, relative):
    root = tmp_path_factory.getbasetemp() / "contain-root"
    root.mkdir(exist_ok=True)
    try:
        path = inside(root, relative)
    except UnsafePathError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    resolved = path.resolve()
    assert resolved != root and resolved.is_relative_to(root.resolve()), relative
    assert ".." not in parts_of(relative)


@pytest.fixture(scope="module")
def verify_field(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """DIR with ``a/1.dcm`` and a link ``l`` to a folder outside holding a ``1.dcm`` of its own."""
    base = tmp_path_factory.mktemp("verify-field")
    out, outside = base / "out", base / "outside"
    (out / "a").mkdir(parents=True)
    outside.mkdir()
    (out / "a" / "1.dcm").write_bytes(b"inside")
    (outside / "1.dcm").write_bytes(b"outside")
    (out / "l").symlink_to(outside, target_is_directory=True)
    return out, outside


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "l", "..", ".", "", "1.dcm", "out", "outside", "//"]), min_size=1,
                max_size=6).map("/".join))
def test_verify_never_reads_a_file_outside_dir(verify_field, relative):
    """Whatever path harvest.json gives a file, verify reads it only if it is inside DIR with no
    link on the way; otherwise it reports the path, with its record, and reads nothing."""
    from harvester.api import verify_tree

    out, outside = verify_field
    doc = {"schema": "harvester/1", "series": [{"SeriesInstanceUID": "1.2", "status": "complete", "path": "a",
                                                "files": [{"path": relative, "size": 6,
                                                           "md5": hashlib.md5(b"inside").hexdigest()}]}]}
    (out / "harvest.json").write_text(json.dumps(doc))
    result = verify_tree(out)
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if relative.startswith("/") or not parts or ".." in parts or parts[0] == "l":   # the one link is DIR/l
        assert result.files == 0 and len(result.problems) == 1, (relative, result.problems)
        assert result.problems[0].startswith("harvest.json series #1 (1.2): "), result.problems
    elif parts == ["a", "1.dcm"]:
        assert result.files == 1 and result.ok, (relative, result.problems)
    else:
        assert result.files == 0 and result.problems in ([f"{relative}: missing"],
                                                         [f"{relative}: unreadable (not a regular file)"],
                                                         [f"{relative}: unreadable (Is a directory)"],
                                                         [f"{relative}: unreadable (Not a directory)"]), result.problems


def test_open_dir_never_follows_a_link_swapped_in(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    with open_dir(root, "a/b/c", create=True) as fd:
        assert os.path.samestat(os.fstat(fd), os.stat(root / "a" / "b" / "c"))
    shutil.rmtree(root / "a" / "b")
    (root / "a" / "b").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match=r"a/b is a symbolic link"):
        with open_dir(root, "a/b/c", create=True):
            pass
    assert not list(outside.iterdir())


# ------------------------------------------------------ every command, no traceback

def hostile_dir(template: Path, root: Path, decoy: Path) -> Path:
    """A harvest someone sent: files listed as ../x, /abs and NUL, a wrong-typed file list, a
    series folder that is a link outside, a FIFO under a file's name, an unreadable journal line."""
    out = copy_harvest(template, root / "hostile")
    doc = manifest(out)
    recs = [r for r in doc["series"] if r["status"] == "complete"]
    recs[0]["files"][0]["path"] = "../decoy/x.dcm"
    recs[1]["files"][0]["path"] = "/etc/hostname"
    recs[2]["files"][0]["path"] = "a\x00b"
    recs[3]["files"] = [["not", "a", "dict"], 7, None]
    folder = out / recs[4]["path"]
    shutil.move(folder, decoy / "moved-series")
    folder.symlink_to(decoy / "moved-series", target_is_directory=True)
    fifo = out / recs[5]["files"][0]["path"]
    fifo.unlink()
    os.mkfifo(fifo)
    (out / "harvest.json").write_text(json.dumps(doc, indent=1))
    with (out / ".harvester" / "journal.jsonl").open("a") as fh:
        fh.write('{"event": "commit", "series": {"SeriesInstanceUID": "9.9", "status": "complete", '
                 '"path": "../../escape", "files": [{"path": "../../escape/1.dcm", "size": 1, "md5": "x"}]}}\n')
        fh.write('{"event": "forget", "uid": "9.8", "path": "../decoy/keep", "trash": ".harvester/trash/x"}\n')
    return out


def own_files_hostile_dir(template: Path, root: Path, decoy: Path) -> Path:
    """A harvest whose own files are traps: harvest.json is a FIFO (a plain read blocks for ever)
    and an old journal is a link to a file outside DIR (reading it would read there)."""
    out = copy_harvest(template, root / "hostile")
    (out / "harvest.json").unlink()
    os.mkfifo(out / "harvest.json")
    journal = out / ".harvester" / "journal.jsonl"
    journal.unlink(missing_ok=True)
    journal.symlink_to(decoy / "x.dcm")
    return out


#: variant -> (how to build DIR, command -> exit codes it may end with, what a fatal stop names)
HOSTILE_DIRS = {
    "records and links": (hostile_dir, {"verify": {1}, "verify --repair": {3}, "status": {0}, "status --json": {0},
                                        "report": {0}, "export": {0}, "run": {3}, "sync": {3},
                                        "sync --dry-run": {3}, "serve": {0}},
                          "is a symbolic link inside the output directory"),
    "DIR's own files": (own_files_hostile_dir, {"verify": {2}, "verify --repair": {3}, "status": {2},
                                                "status --json": {2}, "report": {2}, "export": {2}, "run": {3},
                                                "sync": {3}, "sync --dry-run": {3}, "serve": {2}},
                        "journal.jsonl is a symbolic link inside the output directory"),
}


@pytest.mark.parametrize("variant", list(HOSTILE_DIRS))
def test_every_command_on_a_hostile_directory_ends_without_a_traceback(variant, template, place, server,
                                                                       small_archive, figures):
    """Each CLI command (run, sync, verify, verify --repair, status, report, export, serve) on a
    hostile DIR, under ``-X faulthandler``: no traceback, no hang, the exit code its class says,
    one line naming the link when it stops, and the decoy beside DIR unchanged."""
    build, expected, fatal_names = HOSTILE_DIRS[variant]
    root, decoy = place
    out = build(template, root, decoy)
    before = tree_state(decoy)
    query = write_query(root / "q.yaml", select_all(small_archive))
    exports = root / "exports"
    exports.mkdir()
    api = ["--api-url", server.base_url]
    commands: dict[str, list[Any]] = {
        "verify": ["verify", out],
        "verify --repair": ["verify", out, "--repair", *api, "--timeout", "10"],
        "status": ["status", out],
        "status --json": ["status", out, "--json"],
        "report": ["report", out, "-o", exports / "report.html"],
        "export": ["export", out, "--tcia", exports / "c.tcia", "--csv", exports / "s.csv"],
        "run": ["run", query, "-o", out, *api, *FAST_FLAGS],
        "sync": ["sync", query, "-o", out, *api, *FAST_FLAGS],
        "sync --dry-run": ["sync", query, "-o", out, "--dry-run", *api, *FAST_FLAGS],
    }
    for label, args in commands.items():
        proc = cli(*args)
        no_traceback(proc)
        assert proc.returncode in expected[label], (label, proc.returncode, proc.stdout[-1500:], proc.stderr[-1500:])
        if proc.returncode == 3:
            assert fatal_names in error_line(proc, 3), label
        elif proc.returncode == 2:
            error_line(proc, 2)
        assert tree_state(decoy) == before, label
    # serve: loads what is safe, warns about the rest, answers, stops cleanly on SIGTERM
    if expected["serve"] == {2}:
        error_line(cli("serve", out, "--port", "0"), 2)
    else:
        proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "harvester", "serve", str(out),
                                 "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        try:
            base = proc.stdout.readline().strip()
            assert base.startswith("http://127.0.0.1:"), base
            status, body = _get(base, "getSeries")
            assert status == 200 and json.loads(body)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err and proc.returncode == 0, err[-3000:]
    assert tree_state(decoy) == before
    record(figures, f"every CLI command (run, sync, verify, verify --repair, status, report, export, serve) on "
           f"a hostile DIR: {variant}", len(commands) + 1, "/".join(sorted({str(c) for v in expected.values() for c in v})),
           "no traceback, no hang (-X faulthandler); a stop names the link", root)
