"""The one redaction point: every message that can be stored or shown passes through ``redact``.

Two layers, so that nothing depends on a secret being recognised by its shape alone:

* the secrets the process knows (the password, the bearer token, every token the token endpoint
  issued, the password of a ``user:password@`` URL) are registered with ``SECRETS.add`` by the
  code that holds them (``make_session``, ``TokenAuth``, the DICOMweb client); their literal
  value, URL-encoded forms and base64 forms (alone and as the ``user:password`` pair of HTTP
  basic auth) are replaced wherever they appear, whatever text carries them (a URL, a server's
  error page echoing the request, an exception's ``str``);
* shapes that are secrets whoever wrote them: ``user:password@`` in a URL, ``token=``-style
  query or form parameters, and ``Bearer``/``Basic`` credentials. Readers of a harvest
  directory (``status``, ``report``, ``export``) know no secret, so this layer also scrubs
  what older runs may have stored.

``HarvesterError`` applies ``redact`` to every message it is built with, so an error cannot
carry a secret into the journal, harvest.json, report.html, an export, an event or the terminal.
The registry is process-wide on purpose (like a logging filter): a secret learnt by one client
must be scrubbed from a message built anywhere else.
"""
from __future__ import annotations

import base64
import re
import threading
from urllib.parse import quote, quote_plus

MASK = "***"
#: query/form parameters whose value is a secret, whoever sends them
SECRET_PARAMS = ("password", "passwd", "token", "access_token", "refresh_token", "id_token", "client_secret",
                 "api_key", "apikey", "api-key", "session_state", "x-amz-signature", "signature")
_PARAM_RE = re.compile(r"(?i)(?<![A-Za-z0-9_-])(" + "|".join(re.escape(p) for p in SECRET_PARAMS)
                       + r")(\s*[=:]\s*|\"\s*:\s*\")([^&\s\"',;<>)}\]]+)")
_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@?#]+@")
_AUTH_RE = re.compile(r"\b(Bearer|Basic|bearer)(\s+)[A-Za-z0-9\-._~+/]{8,}=*")  # a credential, not "basic auth"
MIN_SECRET = 4  # shorter values would mask ordinary words
MAX_SECRET = 64 * 1024  # longer than any token or password we hold


class SecretRegistry:
    """The secrets this process knows, in every form a server could echo them."""

    def __init__(self) -> None:
        self._forms: set[str] = set()
        self._lock = threading.Lock()

    def add(self, secret: str | None, *, user: str | None = None) -> None:
        """Register ``secret`` (and, with ``user``, the ``user:secret`` basic-auth pair)."""
        if not secret or len(secret) < MIN_SECRET:
            return
        forms = {secret, quote(secret, safe=""), quote_plus(secret), quote(secret)}
        raw = [secret.encode("utf-8")]
        if user is not None:
            raw.append(f"{user}:{secret}".encode("utf-8"))
        for data in raw:
            forms.add(base64.b64encode(data).decode("ascii").rstrip("="))
            forms.add(base64.urlsafe_b64encode(data).decode("ascii").rstrip("="))
        with self._lock:
            self._forms |= {f for f in forms if len(f) >= MIN_SECRET}

    def scrub(self, text: str) -> str:
        with self._lock:
            forms = sorted(self._forms, key=len, reverse=True)  # longest first: no half-masked secret
        for form in forms:
            if form in text:
                text = text.replace(form, MASK)
        return text

    def clear(self) -> None:  # for tests
        with self._lock:
            self._forms.clear()


SECRETS = SecretRegistry()


def redact(text: str, limit: int | None = None) -> str:
    """``text`` without any known secret or secret-shaped value; cut to ``limit`` characters
    (with "...") when given. Never raises."""
    if not isinstance(text, str):
        text = str(text)
    if limit is not None:
        # bounded work on a huge text; a secret (a token is at most a few KB) cut at this point
        # lies past ``limit``, so the cut below drops what the scrubbing could not recognise
        text = text[: limit + MAX_SECRET]
    text = SECRETS.scrub(text)
    text = _USERINFO_RE.sub(r"\1", text)
    text = _AUTH_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    text = _PARAM_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    return text


def excerpt(body: bytes | str, limit: int = 200) -> str:
    """A bounded, redacted, one-line excerpt of server text for a message; ``(HTML error page)``
    for HTML (its text is noise, and may echo the request)."""
    text = body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else str(body)
    text = " ".join(text[: limit * 20].split())
    if "<html" in text.lower() or "<!doctype" in text.lower():
        return "(HTML error page)"
    return redact(text, limit)
