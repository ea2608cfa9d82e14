"""Seed sets for the parametrised soak and kill campaigns, from the environment."""
from __future__ import annotations

import os


def seeds_from_env(name: str, default: list[int]) -> list[int]:
    """``$name``: ``N`` -> seeds 1..N; ``3,7,9`` -> those seeds; unset or empty -> ``default``.

    Raises ``ValueError`` for anything else, so a typo cannot silently shrink a long soak.
    """
    text = os.environ.get(name, "").strip()
    if not text:
        return list(default)
    if "," not in text:
        count = int(text)
        if count < 1:
            raise ValueError(f"{name}={text}: need at least one seed")
        return list(range(1, count + 1))
    return [int(part) for part in text.split(",") if part.strip()]


SOAK_SEEDS_ENV = "HARVESTER_SOAK_SEEDS"
KILL_SEEDS_ENV = "HARVESTER_KILL_SEEDS"
#: What CI runs when the variables are unset.
CI_SOAK_SEEDS = [1, 2]
CI_KILL_SEEDS = [1]
