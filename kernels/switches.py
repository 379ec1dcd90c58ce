"""TPSERVE_* environment switches: one reader, so that each checks its value the same
way, and a mistyped one says what it takes instead of silently meaning something."""
from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """The value of environment variable `name` if it is one of `choices`; unset, the
    default; anything else warns, naming the choices, and gives the default."""
    raw = os.environ.get(name, default)
    if raw in choices:
        return raw
    named = " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices)
    logger.warning("%s=%r is not %s; using %s", name, raw, named, default)
    return default
