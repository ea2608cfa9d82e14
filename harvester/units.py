"""Sizes and rates as users write them: the one parser behind every option that takes one
(``--max-rate``, ``--faults rate=/total_rate=``, ``--synthetic size=``, ...); and counts and
sizes as archives and harvest.json send them (``as_int``).

Units are case-sensitive and mean what the SI and IEC say, as in rclone's and the Linux
kernel's docs: ``kB``/``KB``, ``MB``, ``GB``, ``TB`` are decimal (1000, 1000**2, ...);
``KiB``, ``MiB``, ``GiB``, ``TiB`` are binary (1024, 1024**2, ...); ``B`` or no unit is
bytes. A rate may end in ``/s``. Anything else is rejected rather than guessed: ``2M``
(rclone reads MiB, others MB), ``2mb`` (milli-bits, strictly), ``2Mb`` (megabits).
"""
from __future__ import annotations

import re
from typing import Any

DECIMAL = {"kB": 1000, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}
BINARY = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}
UNITS = {"": 1, "B": 1, **DECIMAL, **BINARY}
#: What --help says about sizes.
SIZE_HELP = "kB/KB, MB, GB are decimal (1 MB = 1,000,000 B), KiB, MiB, GiB binary; no unit is bytes"

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(text: str, *, rate: bool = False) -> int:
    """``"50MB"`` -> 50000000, ``"4MiB"`` -> 4194304, ``"512"`` -> 512; with ``rate``,
    ``"50MB/s"`` too. Fractions are rounded down to whole bytes.

    Raises ``ValueError`` (one line: what was wrong and how to write it) for anything else.
    """
    body = text[:-2].rstrip() if rate and text.rstrip().endswith("/s") else text
    match = _SIZE.fullmatch(body)
    if match is None or match.group(2) not in UNITS:
        unit = match.group(2) if match else ""
        raise ValueError(f"not a {'rate' if rate else 'size'}: {text!r} ({_suggest(match, unit)})")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def _suggest(match: re.Match[str] | None, unit: str) -> str:
    """How to write what ``unit`` probably meant (``2M``, ``2mb``, ``2Mb`` -> ``2MB`` or ``2MiB``)."""
    prefix = unit[:1].upper()
    decimal = next((u for u in DECIMAL if u[0].upper() == prefix), None) if unit else None
    binary = next((u for u in BINARY if u[0] == prefix), None) if unit else None
    if match is not None and decimal and binary:
        n = float(match.group(1))
        return (f"write {match.group(1)}{decimal} for {int(n * DECIMAL[decimal]):,} bytes or {match.group(1)}{binary} "
                f"for {int(n * BINARY[binary]):,}; units are case-sensitive")
    return "e.g. 512KiB, 50MB, 1GiB: MB is decimal (1,000,000 bytes), MiB binary (1,048,576)"


def as_int(value: Any) -> int | None:
    """Parse counts and sizes that may arrive as int, float, "1234" or "1234.0"."""
    if value.__class__ is int:   # most of them (a plan reads four per series): exact, and no float
        return value if 0 <= value <= 2**62 else None
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if number != number or number < 0 or number > 2**62:  # NaN, negative, absurd
        return None
    return int(number)
