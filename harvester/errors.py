"""Every error the harvester raises, classified by what the caller should do next.

The classes follow rclone's ``fs/fserrors`` idea: the type says whether to retry the
request, retry the series later, give up on the series, or stop the whole job::

    HarvesterError                  base; ``str(e)`` is one line for the user, ``e.hint`` says what to do
    ├── UsageError                  bad command line or input file -> exit code 2, nothing started
    │   ├── ManifestError           malformed query manifest, .tcia cart or CSV (names the file and key)
    │   └── UnknownSelectionError   a collection or series the archive does not have (lists close matches)
    ├── RequestError                one HTTP request failed
    │   ├── RetryableRequestError   retry this request: connection reset, timeout, stall, 5xx, 408, 429,
    │   │                           a broken HTTP answer (``retry_after``: the server's Retry-After, in s)
    │   ├── ServerBusyError         not this request again now: a Retry-After past the cap (or unusable);
    │   │                           the series is tried again later, then failed with the reason
    │   └── PermanentRequestError   do not retry: other 4xx (NBIA says "access denied" with HTTP 400),
    │                               a refused redirect or a loop, JSON too large or nested too deep
    ├── SeriesError                 this series failed; the engine retries the whole series later
    │   ├── IncompleteSeriesError   fewer files or bytes than the archive said (a truncated ZIP with HTTP 200)
    │   ├── IntegrityError          MD5 mismatch, not DICOM, a file of another series, a corrupt ZIP,
    │   │   │                       more files or bytes than announced (not the announced series)
    │   │   └── OversizeDownloadError  the download passed the announced size plus the margin (stopped)
    │   └── PermanentSeriesError    give up on this series and go on (hostile ZIP, access denied)
    │       └── UnsafeArchiveError  path traversal, absolute path, symlink, zip bomb
    └── FatalError                  stop every worker cleanly, keep what is verified
        ├── DiskFullError           no space left (or quota / file-size limit) in the output directory
        ├── OutputNotWritableError  the output directory cannot be written
        ├── UnsafePathError         a path from outside leaves DIR, or a symlink inside DIR is on the way
        └── AuthError               credentials rejected even after a token refresh

``should_retry_request`` is the single place that decides whether an exception is worth
another HTTP attempt; tenacity calls it. ``should_retry_series`` decides the series level.
Messages never contain secrets: URLs are passed through ``redact_url`` before they get here, and
every message and hint is passed through ``harvester.redact.redact`` (known secrets in any
encoding, credential-shaped text) and bounded to ``MAX_MESSAGE`` characters when it is built.
"""
from __future__ import annotations

import errno

from harvester.redact import printable, redact

MAX_MESSAGE = 1000  # characters of one error message (server text in it is already cut shorter)


class HarvesterError(Exception):
    """Base class. ``str(err)`` is a single line; ``hint`` tells the user what to do."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(redact(message, MAX_MESSAGE))
        if hint is not None:
            self.hint = redact(hint, MAX_MESSAGE)

    def one_line(self) -> str:
        """The message and the hint on one line, as the CLI prints it."""
        msg = " ".join(str(self).split())
        return printable(f"{msg} ({self.hint})" if self.hint else msg)   # safe on a terminal


class UsageError(HarvesterError):
    """Bad usage or input: nothing was started. Exit code 2."""

    hint = "see --help"


class ManifestError(UsageError):
    """A query manifest, .tcia cart or CSV that cannot be used; names the file and the key."""

    hint = "fix the file and run again"


class UnknownSelectionError(UsageError):
    """The archive has no such collection or series."""

    hint = "check the name, or list what exists with: harvester query getCollectionValues"


class RequestError(HarvesterError):
    """One HTTP request failed. ``status`` is the HTTP status, or None for transport errors."""

    def __init__(self, message: str, *, status: int | None = None, url: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.url = url


class RetryableRequestError(RequestError):
    """Worth another attempt: reset, timeout, stall, 5xx, 408, 429. When it reaches the user,
    every attempt has failed."""

    hint = "no attempt succeeded; check the URL and the network, or run again later"

    def __init__(self, message: str, *, status: int | None = None, url: str = "",
                 retry_after: float | None = None, hint: str | None = None, timed_out: bool = False) -> None:
        super().__init__(message, status=status, url=url, hint=hint)
        self.retry_after = retry_after
        #: the server pushed back (429, 503) or did not answer in time: a sign to slow down
        self.overload = timed_out or status in (429, 503)


class ServerBusyError(RequestError):
    """The server asked to wait longer than ``config.max_retry_after`` (or gave an unusable
    Retry-After): the request is not retried on that wait; the series is tried again later."""

    hint = "the archive asked to wait too long; run the same command again later to resume"


class PermanentRequestError(RequestError):
    """Not worth retrying: the server said no (4xx other than 408/429)."""

    hint = "the server refused the request; check the query or your access rights"


class SeriesError(HarvesterError):
    """A series failed after its request-level retries; retry the whole series later."""

    def __init__(self, message: str, *, series_uid: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.series_uid = series_uid


class IncompleteSeriesError(SeriesError):
    """The download held fewer files or bytes than the archive announced."""

    hint = "the server sent a truncated series"


class IntegrityError(SeriesError):
    """A file did not match its MD5, was not DICOM, belonged to another series, or the ZIP was corrupt."""

    hint = "the download was corrupt"


class OversizeDownloadError(IntegrityError):
    """The ZIP grew past the size the archive announced for the series plus the margin."""

    hint = "the download was stopped and removed; the series is tried again, then failed with this reason"


class PermanentSeriesError(SeriesError):
    """Give up on this series (after recording why) and go on with the others."""

    hint = "this series was skipped; the others continue"


class UnsafeArchiveError(PermanentSeriesError):
    """The ZIP tried to write outside its folder, held a symlink, or expanded like a zip bomb."""

    hint = "nothing from this ZIP was written; report the series to the archive"


class FatalError(HarvesterError):
    """Stop every worker cleanly. Verified series stay on disk and in the manifest."""


class DiskFullError(FatalError):
    hint = "free some space (verified series are kept) and run the same command again to resume"


class OutputNotWritableError(FatalError):
    hint = "choose an output directory you can write to (-o DIR)"


class UnsafePathError(FatalError):
    """A path that came from outside (manifest, journal, harvest.json, server, template) is not
    strictly inside DIR, or a symbolic link inside DIR lies on it. ``path`` is the path refused.
    Fatal for a run (exit 3: DIR was tampered with, and only the user can say what the link is
    for); ``verify`` and ``serve`` report it and go on with the rest."""

    hint = "remove the link or fix the record, then run the same command again; verified series are kept"

    def __init__(self, message: str, *, path: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path


class AuthError(FatalError):
    hint = "check the user name and the password file or environment variable"


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def classify_os_error(err: OSError, what: str) -> HarvesterError:
    """Turn an OSError met while writing into a FatalError when the disk itself is the problem.

    Returns ``DiskFullError`` for ENOSPC/EDQUOT/EFBIG, ``OutputNotWritableError`` for
    EACCES/EPERM/EROFS, and a plain ``SeriesError`` otherwise (retry the series).
    """
    if err.errno in _DISK_FULL_ERRNOS:
        return DiskFullError(f"disk full while writing {what}")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputNotWritableError(f"cannot write {what}: {err.strerror}")
    return SeriesError(f"I/O error while writing {what}: {err.strerror or err}")


def should_retry_request(exc: BaseException) -> bool:
    """The one rule for request-level retries (tenacity's ``retry=`` predicate)."""
    return isinstance(exc, RetryableRequestError)


def should_retry_series(exc: BaseException) -> bool:
    """Whether a failed series is worth another attempt later in the same run."""
    if isinstance(exc, (PermanentSeriesError, PermanentRequestError, FatalError, UsageError)):
        return False
    return isinstance(exc, (SeriesError, RequestError, OSError))
