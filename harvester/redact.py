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
import html
import json
import re
import threading
from urllib.parse import quote, quote_plus

MASK = "***"
#: query/form parameters whose value is a secret, whoever sends them; a name that ends in one of
#: ``SECRET_SUFFIXES`` is one too (``auth_token``, ``x-amz-security-token``, ``client-secret``)
SECRET_PARAMS = ("password", "passwd", "token", "access_token", "refresh_token", "id_token", "client_secret",
                 "api_key", "apikey", "api-key", "session_state", "x-amz-signature", "signature")
SECRET_SUFFIXES = ("password", "passwd", "token", "secret", "signature", "api_key", "api-key", "apikey")
#: secrets only as URL parameters (``?key=...``): in prose "a key: x" is a word
URL_SECRET_PARAMS = ("key", "sig")
_NAME = (r"(?:[A-Za-z0-9_-]*(?:" + "|".join(re.escape(p) for p in SECRET_SUFFIXES) + r")|"
         + "|".join(re.escape(p) for p in SECRET_PARAMS) + ")")
_VALUE = r"([^&\s\"',;<>)}\]]+)"
_PARAM_RE = re.compile(r"(?i)(?<![A-Za-z0-9_-])(" + _NAME + r")(\s*[=:]\s*|\"\s*:\s*\")" + _VALUE)
_URL_PARAM_RE = re.compile(r"(?i)(?<=[?&;])(" + "|".join(URL_SECRET_PARAMS) + r")(=)" + _VALUE)
_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@?#]+@")
_AUTH_RE = re.compile(r"\b(Bearer|Basic|bearer)(\s+)[A-Za-z0-9\-._~+/]{8,}=*")  # a credential, not "basic auth"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
MIN_SECRET = 4  # shorter values alone would mask ordinary words (as a user:secret pair they are masked)
MAX_SECRET = 64 * 1024  # longer than any token or password we hold


def is_secret_param(name: str) -> bool:
    """Whether a query or form parameter called ``name`` carries a secret."""
    name = name.lower()
    return name in SECRET_PARAMS or name in URL_SECRET_PARAMS or name.endswith(SECRET_SUFFIXES)


def printable(text: str) -> str:
    """``text`` with control characters (ESC, CSI, BEL, CR...) shown as ``\\xNN``: safe on a terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)


def _echoes(text: str) -> set[str]:
    """The forms a server may echo ``text`` in: as it is, URL-encoded, JSON-escaped (NBIA writes
    ``/`` as ``\\/``), as XML/HTML text, and with its white space folded (as ``excerpt`` does)."""
    forms = {text, quote(text, safe=""), quote_plus(text), quote(text)}
    for ascii_only in (True, False):
        escaped = json.dumps(text, ensure_ascii=ascii_only)[1:-1]
        forms |= {escaped, escaped.replace("/", "\\/")}
    forms |= {html.escape(text, quote=True), html.escape(text, quote=False)}
    forms.add(" ".join(text.split()))
    return forms


class SecretRegistry:
    """The secrets this process knows, in every form a server could echo them."""

    def __init__(self) -> None:
        self._forms: dict[str, str] = {}   # form -> what replaces it
        self._lock = threading.Lock()

    def add(self, secret: str | None, *, user: str | None = None) -> None:
        """Register ``secret`` (and, with ``user``, the ``user:secret`` basic-auth pair, also when
        the secret alone is too short to mask: ``carol:p1!`` becomes ``carol:***``)."""
        if not secret or len(secret) > MAX_SECRET:
            return
        forms: dict[str, str] = {}
        if user is not None:
            pair = f"{user}:{secret}"
            forms |= {form: f"{user}:{MASK}" for form in _echoes(pair)}
        if len(secret) >= MIN_SECRET:
            forms |= {form: MASK for form in _echoes(secret)}
            raw = [secret.encode("utf-8")] + ([f"{user}:{secret}".encode("utf-8")] if user is not None else [])
            for data in raw:
                forms[base64.b64encode(data).decode("ascii").rstrip("=")] = MASK
                forms[base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")] = MASK
        with self._lock:
            self._forms.update({f: r for f, r in forms.items() if len(f) >= MIN_SECRET and f.strip()})

    def scrub(self, text: str) -> str:
        with self._lock:
            forms = sorted(self._forms.items(), key=lambda fr: len(fr[0]), reverse=True)  # longest first
        for form, mask in forms:
            if form in text:
                text = text.replace(form, mask)
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
    text = _URL_PARAM_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    return text


def excerpt(body: bytes | str, limit: int = 200) -> str:
    """A bounded, redacted, one-line excerpt of server text for a message; ``(HTML error page)``
    for HTML (its text is noise, and may echo the request). The known secrets are scrubbed before
    the white space is folded (a password with two spaces in it is still recognised), and
    control characters are shown as ``\\xNN``."""
    text = body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else str(body)
    text = " ".join(SECRETS.scrub(text[: limit * 20 + MAX_SECRET]).split())[: limit * 20]
    if "<html" in text.lower() or "<!doctype" in text.lower():
        return "(HTML error page)"
    return printable(redact(text, limit))
