"""The one gate between a path that came from outside and the output directory.

Every relative path that comes from a manifest, the journal, harvest.json, the server or a
layout template is resolved here before anything under DIR is read, written, renamed or deleted:

* ``inside(root, relative)`` returns ``root / relative`` when ``relative`` is a plain relative
  path (no NUL, no absolute or drive part, no ``..``, not DIR itself) and none of its components
  that exist is a symbolic link; it raises ``UnsafePathError`` naming the path otherwise. DIR
  itself may be a link (``~/data -> /mnt/data`` is the user's choice); nothing below it may.
  Refusing every link on the way, rather than resolving and comparing, also refuses a link that
  points back inside DIR: nothing the harvester writes depends on where a link points.
* ``open_dir(root, relative, create=...)`` walks the same path one component at a time with
  ``O_NOFOLLOW | O_DIRECTORY`` relative to the parent's descriptor (openat), creating what is
  missing, so a folder swapped for a link between the check and the write is refused too.
  Renames and deletes that matter take ``src_dir_fd``/``dst_dir_fd`` from it.
* ``open_nofollow``: an opener for reading a file from DIR: the last component is not followed,
  and only a regular file is opened (no FIFO or device, so nothing hangs).
* ``read_bytes(path)``: the whole of one of DIR's own files (harvest.json, the journal) read
  through ``open_nofollow``: a link or a FIFO under that name raises ``OSError``, never hangs.
* ``open_indexed``: the opener of ``harvester serve``, which indexed each file by its resolved
  path when it loaded DIR and opens it at request time: besides the above, the file opened must
  still live at exactly that path (the kernel's name of the descriptor), so a file or any folder
  above it swapped for a link after loading is refused, never read.

The callers decide what a refusal means: a fatal stop for the state and the engine (exit 3), a
reported problem for ``verify`` and ``verify --repair``, a series not served for ``serve``.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PureWindowsPath

from harvester.errors import UnsafePathError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _shown(text: object) -> str:
    """A path as a message shows it: quoted, and cut at 200 characters (one readable line)."""
    text = str(text)
    return repr(text if len(text) <= 200 else text[:200] + "...")


def parts_of(relative: str | os.PathLike[str]) -> tuple[str, ...]:
    """The components of a relative path from outside; raises ``UnsafePathError`` for anything
    that could name a place other than strictly inside DIR (empty, NUL, absolute, drive, ``..``,
    in POSIX or Windows spelling). String operations only: it runs for every file of every record
    when DIR is opened."""
    text = os.fspath(relative)
    if not isinstance(text, str) or not text or "\x00" in text:
        raise UnsafePathError(f"refusing path {_shown(text)}: empty or with a NUL byte", path=str(text))
    if text.startswith("/"):
        raise UnsafePathError(f"refusing absolute path {_shown(text)}", path=text)
    if "\\" in text or ":" in text:   # only then can Windows read it otherwise than POSIX does
        windows = PureWindowsPath(text)
        if windows.drive or windows.root:
            raise UnsafePathError(f"refusing absolute path {_shown(text)}", path=text)
        if ".." in windows.parts:
            raise UnsafePathError(f"refusing path {_shown(text)}: it climbs out with '..'", path=text)
    parts = tuple(p for p in text.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafePathError(f"refusing path {_shown(text)}: it climbs out with '..'", path=text)
    if not parts:
        raise UnsafePathError(f"refusing path {_shown(text)}: it names the output directory itself", path=text)
    return parts


def inside(root: Path, relative: str | os.PathLike[str]) -> Path:
    """``root / relative``, checked: see the module docstring. Raises ``UnsafePathError`` naming
    the first link met (or the bad path)."""
    return Path(inside_text(root, relative))


def inside_text(root: Path | str, relative: str | os.PathLike[str]) -> str:
    """``inside`` as a string, with no ``Path`` made per component (a reader that checks every
    file of a harvest: pathlib interns each part of each path it builds)."""
    parts = parts_of(relative)
    path = os.fspath(root)
    for part in parts:
        path = os.path.join(path, part)
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            # missing: nothing below it exists, so no link either; a file where a folder should
            # be (ENOTDIR): the write itself fails
            break
        if stat.S_ISLNK(mode):
            raise link_error(Path(root), Path(path))
    return os.path.join(os.fspath(root), *parts)


def link_error(root: Path, link: Path) -> UnsafePathError:
    """The one-line refusal of a symbolic link found at ``link`` inside ``root``."""
    try:
        shown = link.relative_to(root)
    except ValueError:
        shown = link
    return UnsafePathError(f"{root}/{shown} is a symbolic link inside the output directory; refusing to "
                           f"follow it", path=str(link))


def check_not_link(root: Path, path: Path) -> None:
    """Raise ``UnsafePathError`` when ``path`` (one of DIR's fixed names: ``.harvester``, its
    ``tmp``, ``licenses``, the journal, the lock) is a symbolic link."""
    if path.is_symlink():
        raise link_error(root, path)


@contextlib.contextmanager
def open_dir(root: Path, relative: str | os.PathLike[str] | None = None, *, create: bool = False
             ) -> Iterator[int]:
    """A descriptor of the folder ``root / relative``, reached without following any link below
    ``root`` (each component opened with ``O_NOFOLLOW`` relative to its parent). With ``create``,
    missing folders are made on the way (``mkdir`` relative to the parent's descriptor).

    Raises ``UnsafePathError`` when a component is a link, and ``OSError`` for the rest
    (ENOENT without ``create``, ENOTDIR, EACCES...).
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        path = root
        rel = "" if relative is None else os.fspath(relative)
        for part in (parts_of(rel) if rel not in ("", ".") else ()):   # "" or ".": ``root`` itself
            path = path / part
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, 0o777, dir_fd=fd)   # the umask applies, as for Path.mkdir
                except FileExistsError:
                    pass  # made meanwhile (another worker): opened below, not followed either
                child = _open_child_dir(fd, part, root, path)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link_at(fd, part):
                    raise link_error(root, path) from None
                raise
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _open_child_dir(parent: int, name: str, root: Path, path: Path) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link_at(parent, name):
            raise link_error(root, path) from None
        raise


def _is_link_at(parent: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=parent).st_mode)
    except OSError:
        return False


def open_nofollow(path: str, flags: int) -> int:
    """An ``opener=`` for ``open()``/``aiofiles.open()`` that never follows a link at the last
    component and opens nothing but a regular file (a FIFO or a device raises ``OSError``
    instead of blocking the open or the reads)."""
    # O_NONBLOCK: a FIFO planted under a file's name must not hang the open (refused below).
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: Path) -> bytes:
    """All of ``path``, a regular file reached without following a link at its name. Raises
    ``OSError`` (FileNotFoundError, ELOOP for a link, EINVAL for a FIFO or device)."""
    with open(path, "rb", opener=open_nofollow) as fh:
        return fh.read()


_FD_NAME = "/proc/self/fd/{}"


def open_indexed(path: str, flags: int) -> int:
    """An ``opener=`` for a file indexed by its resolved, absolute ``path`` (see the module
    docstring). Raises ``OSError`` (ELOOP for a link at the end, EXDEV when the file opened lives
    elsewhere: a folder on the way became a link). Where the system has no ``/proc`` the check
    of the location is left out; ``O_NOFOLLOW`` still holds."""
    fd = open_nofollow(path, flags)
    try:
        try:
            where = os.readlink(_FD_NAME.format(fd))
        except OSError:
            return fd
        if where != os.path.abspath(path):
            raise OSError(errno.EXDEV, "the file opened is not where it was indexed (a link on the way?)", path)
    except BaseException:
        os.close(fd)
        raise
    return fd
