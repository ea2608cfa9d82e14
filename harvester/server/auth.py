"""OAuth2 password-grant tokens as NBIA hands them out (Keycloak-shaped JSON).

Without a :class:`ServerAuth` the token endpoint gives a token to anyone (nbiatoolkit always
asks for one as ``nbia_guest``) and no request needs one. With it, only the listed users get
tokens and every API request must carry a valid, unexpired ``Authorization: Bearer`` token.
Tokens and passwords never appear in logs or reprs.
"""
from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_SCOPE = "openid profile email"


@dataclass(frozen=True)
class ServerAuth:
    """Users allowed to log in (name -> password) and token lifetimes in seconds.

    ``clock`` is injectable so tests can expire tokens without sleeping.
    """

    users: Mapping[str, str] = field(repr=False)
    expires_in: int = 7200
    refresh_expires_in: int = 86400
    clock: Callable[[], float] = time.monotonic

    def __repr__(self) -> str:
        return f"ServerAuth(users={sorted(self.users)!r}, expires_in={self.expires_in})"


class TokenGrantError(Exception):
    """A token request that must be refused; ``status`` and ``error`` go into the reply."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error


class TokenIssuer:
    """Issues, refreshes and checks tokens. Lives on the server's event loop (not thread-safe)."""

    def __init__(self, auth: ServerAuth | None) -> None:
        self.auth = auth
        self._clock: Callable[[], float] = auth.clock if auth else time.monotonic
        self._access: dict[str, tuple[str, float]] = {}   # token -> (user, expiry)
        self._refresh: dict[str, tuple[str, float]] = {}  # refresh token -> (user, expiry)

    @property
    def required(self) -> bool:
        """Whether API requests must carry a token."""
        return self.auth is not None

    def _purge(self, now: float) -> None:
        for table in (self._access, self._refresh):
            for token in [t for t, (_, expiry) in table.items() if expiry <= now]:
                del table[token]

    def _issue(self, user: str) -> dict[str, Any]:
        now = self._clock()
        self._purge(now)
        expires_in = self.auth.expires_in if self.auth else 7200
        refresh_in = self.auth.refresh_expires_in if self.auth else 86400
        access, refresh = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self._access[access] = (user, now + expires_in)
        self._refresh[refresh] = (user, now + refresh_in)
        return {
            "access_token": access,
            "expires_in": expires_in,
            "refresh_expires_in": refresh_in,
            "refresh_token": refresh,
            "token_type": "bearer",
            "not-before-policy": 0,
            "session_state": secrets.token_hex(16),
            "scope": DEFAULT_SCOPE,
        }

    def grant(self, form: Mapping[str, str]) -> dict[str, Any]:
        """Answer a token request (``grant_type=password`` or ``refresh_token``).

        Raises :class:`TokenGrantError` (400 unsupported grant / missing field, 401 bad
        credentials or unknown/expired refresh token).
        """
        grant_type = form.get("grant_type", "")
        if grant_type == "password":
            user = form.get("username", "")
            if not user:
                raise TokenGrantError(400, "invalid_request", "username is required")
            if self.auth is not None:
                expected = self.auth.users.get(user)
                given = form.get("password", "")
                if expected is None or not hmac.compare_digest(expected.encode(), given.encode()):
                    raise TokenGrantError(401, "invalid_grant", "Invalid user credentials")
            return self._issue(user)
        if grant_type == "refresh_token":
            token = form.get("refresh_token", "")
            entry = self._refresh.pop(token, None)
            if entry is None or entry[1] <= self._clock():
                if self.auth is None and token:
                    return self._issue("nbia_guest")
                raise TokenGrantError(401, "invalid_grant", "Invalid refresh token")
            return self._issue(entry[0])
        raise TokenGrantError(400, "unsupported_grant_type", f"unsupported grant_type {grant_type!r}")

    def check(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value carries a valid, unexpired access token."""
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        entry = self._access.get(token.strip())
        return entry is not None and entry[1] > self._clock()
