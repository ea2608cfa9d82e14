"""Injected failures: the ways the real NBIA service fails, on demand and reproducibly.

``FaultSpec.parse("error=0.1,throttle=0.05,...")`` describes what to inject;
:class:`FaultInjector` decides, per request, which faults hit it.

Reproducibility invariant: a decision depends only on ``(seed, endpoint, sorted query
parameters, n)`` where ``n`` counts earlier requests with exactly that endpoint and those
parameters since the spec was installed. It never depends on a shared sequential RNG, so
concurrent clients see the same faults run after run, whatever order their requests arrive in.

Which faults apply where: ``error``, ``throttle``, ``reset`` and ``latency`` to every API
endpoint; ``truncate``, ``corrupt``, ``stall``, ``rate`` and ``total_rate`` to downloads.
"""
from __future__ import annotations

import asyncio
import hashlib
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

from harvester import units

#: The fault kinds counted in the server's statistics.
FAULT_KINDS = ("error", "throttle", "reset", "truncate", "corrupt", "stall")

_PROBABILITIES = ("error", "throttle", "reset", "truncate", "corrupt", "stall")
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0}


def parse_size(text: str) -> int:
    """``"4MiB"`` -> 4194304, ``"4MB"`` -> 4000000: :func:`harvester.units.parse_size`, the
    parser every size option shares (a rate may end in ``/s``). Raises ``ValueError``."""
    return units.parse_size(text, rate=True)


def parse_duration(text: str) -> float:
    """``"50ms"`` -> 0.05, ``"30s"`` -> 30.0, ``"2"`` -> 2.0. Raises ``ValueError``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _TIME_UNITS:
        raise ValueError(f"not a duration: {text!r} (use e.g. 50ms, 1.5s)")
    return float(match.group(1)) * _TIME_UNITS[unit]


def parse_key_values(text: str, known: Iterable[str], what: str,
                     convert: Callable[[str, str], object]) -> dict[str, object]:
    """Parse ``key=value,...`` with ``convert(key, raw)`` for each value.

    Raises ``ValueError`` naming ``what`` and the key: unknown, without a value, or a value
    ``convert`` rejected (its message follows).
    """
    known = set(known)
    values: dict[str, object] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if key not in known:
            raise ValueError(f"unknown {what} key {key!r} (known: {', '.join(sorted(known))})")
        if not sep or not raw:
            raise ValueError(f"{what} key {key!r} needs a value")
        try:
            values[key] = convert(key, raw)
        except ValueError as err:
            raise ValueError(f"{what} key {key!r}: {err}") from None
    return values


@dataclass(frozen=True)
class FaultSpec:
    """What to inject. Probabilities are per request, in [0, 1]; everything is off by default."""

    error: float = 0.0          # 500/503 with an HTML body
    throttle: float = 0.0       # 429 with Retry-After
    reset: float = 0.0          # connection aborted (mid-stream on downloads)
    truncate: float = 0.0       # well-formed ZIP, HTTP 200, missing some DICOM entries
    corrupt: float = 0.0        # one DICOM entry's bytes differ from md5hashes.csv
    stall: float = 0.0          # no bytes for ``stall_for`` in the middle of a download
    latency: float = 0.0        # seconds added before every API response
    rate: int | None = None     # bytes/s per download
    total_rate: int | None = None  # bytes/s shared by all downloads
    seed: int = 0
    stall_for: float = 30.0     # seconds
    retry_after: int = 1        # seconds, sent with 429

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """Parse ``key=value,...``. Raises ``ValueError`` naming an unknown key or a bad value."""
        return cls(**parse_key_values(text, (f.name for f in fields(cls)), "fault", _fault_value))  # type: ignore[arg-type]

    @property
    def active(self) -> bool:
        """Whether this spec injects anything at all."""
        return any(getattr(self, name) for name in _PROBABILITIES) or bool(
            self.latency or self.rate or self.total_rate)


def _fault_value(key: str, raw: str) -> object:
    if key in _PROBABILITIES:
        prob = float(raw)
        if not 0.0 <= prob <= 1.0:
            raise ValueError("a probability must be between 0 and 1")
        return prob
    if key in ("latency", "stall_for"):
        return parse_duration(raw)
    if key in ("rate", "total_rate"):
        size = parse_size(raw)
        if size <= 0:
            raise ValueError("a rate must be positive")
        return size
    return int(raw)  # seed, retry_after


@dataclass(frozen=True)
class FaultDecision:
    """The faults one request gets. ``where`` (0..1) places a reset/stall within a download;
    ``pick`` (0..1) chooses how many entries survive a truncation or which entry is corrupted."""

    error_status: int | None = None
    throttle: bool = False
    reset: bool = False
    truncate: bool = False
    corrupt: bool = False
    stall: bool = False
    where: float = 0.5
    pick: float = 0.0


NO_FAULTS = FaultDecision()


class TokenBucket:
    """A bandwidth cap: ``await take(n)`` returns when ``n`` more bytes may be sent.

    GCRA (a virtual-time token bucket): ``_tat`` is the time at which everything booked so
    far would have been sent at ``rate``. Each caller books its bytes on that shared timeline,
    so concurrent downloads share the rate and none can starve another; up to ``burst`` bytes
    may run ahead of the timeline.
    """

    def __init__(self, rate: float, burst: int | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = burst if burst is not None else max(16 * 1024, int(rate / 20))
        self._tat = time.monotonic()

    async def take(self, nbytes: int) -> None:
        now = time.monotonic()
        self._tat = max(self._tat, now) + nbytes / self.rate
        delay = self._tat - now - self.burst / self.rate
        if delay > 0:
            await asyncio.sleep(delay)


def _request_key(endpoint: str, params: Iterable[tuple[str, str]]) -> tuple[str, tuple[tuple[str, str], ...]]:
    return endpoint, tuple(sorted(params))


class FaultInjector:
    """Holds the current :class:`FaultSpec` and decides faults per request.

    Lives on the server's event loop; :meth:`replace` may be called from there (tests call it
    through the loop with ``call_soon_threadsafe``). Replacing the spec restarts the request
    counters and the shared bandwidth bucket, so a run is reproducible from that moment.
    """

    def __init__(self, spec: FaultSpec | None = None) -> None:
        self.spec = spec or FaultSpec()
        self._seen: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
        self.total_bucket: TokenBucket | None = None
        self.replace(spec)

    def replace(self, spec: FaultSpec | None) -> None:
        """Install a new spec (``None`` = no faults)."""
        self.spec = spec or FaultSpec()
        self._seen = {}
        self.total_bucket = TokenBucket(self.spec.total_rate) if self.spec.total_rate else None

    def connection_bucket(self) -> TokenBucket | None:
        """A fresh per-download bucket for the ``rate`` cap, or None when uncapped."""
        return TokenBucket(self.spec.rate) if self.spec.rate else None

    def decide(self, endpoint: str, params: Iterable[tuple[str, str]], *, download: bool) -> FaultDecision:
        """The faults for this request; counts it. Never raises."""
        spec = self.spec
        if not spec.active:
            return NO_FAULTS
        key = _request_key(endpoint, params)
        n = self._seen.get(key, 0)
        self._seen[key] = n + 1
        material = repr((spec.seed, key[0], key[1], n)).encode("utf-8")
        rng = random.Random(int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big"))
        # Invariant: every draw happens on every request, in this order, so turning one fault
        # on or off never shifts the decisions of another.
        draws = {name: rng.random() for name in _PROBABILITIES}
        status = 503 if rng.random() < 0.5 else 500
        where, pick = rng.uniform(0.05, 0.95), rng.random()
        hit = {name: draws[name] < getattr(spec, name) for name in _PROBABILITIES}
        if hit["error"]:
            return FaultDecision(error_status=status)
        if hit["throttle"]:
            return FaultDecision(throttle=True)
        if hit["reset"]:
            return FaultDecision(reset=True, where=where)
        if not download:
            return NO_FAULTS
        return FaultDecision(
            truncate=hit["truncate"], corrupt=hit["corrupt"] and not hit["truncate"],
            stall=hit["stall"], where=where, pick=pick,
        )
